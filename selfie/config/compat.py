"""Run compatibility: which recipe keys change a run's results, the config hash, and run directories of earlier versions."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import typing
from typing import Any

from selfie.config.schema import ADDED, RecipeConfig, TrainConfig, is_section_type, to_dict

# Keys whose change does not alter a run's results; a resumed run may differ in these.
HARMLESS_KEYS = frozenset(
    {
        "report_to",
        "run_name",
        "train.logging_steps",
        "train.save_steps",
        "generate.batch_size",
        "generate.backend",
        "judge.token_budget",
        "train.keep_checkpoints",
    }
)
# Where the run lives, not what it computes: a moved run directory resumes. Hashes written before it was left out
# still count it (selfie/run/rundir.py::made_with accepts them).
LOCATION_KEYS = frozenset({"output_dir"})


def flatten(tree: dict, prefix: str = "", whole: tuple[str, ...] = ()) -> dict[str, Any]:
    """{dotted key: value}; a mapping named in `whole` stays one value."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in whole:
            flat.update(flatten(value, f"{prefix}{key}.", whole))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _same_numbers(value: Any) -> Any:
    """Integral floats as ints, so that equal numbers hash alike: a float field's default 2000 and the 2000.0 its
    config.yaml gives back."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_same_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _same_numbers(v) for k, v in value.items()}
    return value


def _added_defaults(cls: type = RecipeConfig, prefix: str = "") -> dict[str, Any]:
    """{dotted key: default} of the fields made with `added`."""
    hints, defaults = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if f.metadata.get(ADDED):
            defaults[prefix + f.name] = f.default
        elif is_section_type(hints[f.name]):
            defaults.update(_added_defaults(hints[f.name], f"{prefix}{f.name}."))
    return defaults


def _hash(flat: dict[str, Any], leave_out: frozenset[str], exact_numbers: bool = False) -> str:
    unset = _added_defaults()
    kept = {k: v for k, v in flat.items() if k not in leave_out and not (k in unset and v == unset[k])}
    return hashlib.sha256(json.dumps(kept if exact_numbers else _same_numbers(kept), sort_keys=True).encode()).hexdigest()[:16]


def config_hash(
    config: RecipeConfig, leave_out: frozenset[str] = HARMLESS_KEYS | LOCATION_KEYS, exact_numbers: bool = False
) -> str:
    """Hash of everything that changes results (HARMLESS_KEYS and LOCATION_KEYS left out). `exact_numbers`: as
    earlier versions hashed, telling 2000 from 2000.0."""
    return _hash(flatten(to_dict(config)), leave_out, exact_numbers)


# ---- run directories written by earlier versions --------------------------------------------------


def earlier_config_hash(values: dict) -> str:
    """The config_hash an earlier version gave the config.yaml holding `values`: `init` and `eval` were
    untyped mappings then, hashed whole as written, `judge.beta` was a key of its own, and output_dir counted."""
    return _hash(flatten(values, whole=("init", "eval")), HARMLESS_KEYS, exact_numbers=True)


def upgrade_run_values(values: dict) -> tuple[dict, list[str]]:
    """A run's config.yaml values in this version's form, and what in them this version would not reproduce.

    `judge.beta` is gone (the implicit reward is scored with train.beta): a run that judged with the same
    beta as it trained with is unchanged; one that judged with another beta is named.
    """
    values = copy.deepcopy(values)
    judge = values.get("judge")
    if not isinstance(judge, dict) or "beta" not in judge:
        return values, []
    judged_with = judge.pop("beta")
    train = values.get("train") if isinstance(values.get("train"), dict) else {}
    trains_with = train.get("beta", TrainConfig.beta)
    if judged_with == trains_with:
        return values, []
    return values, [f"judge.beta (the run judged with beta {judged_with}; this version judges with train.beta, {trains_with})"]


def changed_values(a: RecipeConfig, b: RecipeConfig) -> dict[str, list[Any]]:
    """{key: [value in a, value in b]} of every results-changing key where they differ."""
    fa, fb = flatten(to_dict(a)), flatten(to_dict(b))
    return {
        k: [fa.get(k), fb.get(k)]
        for k in sorted(set(fa) | set(fb))
        if fa.get(k) != fb.get(k) and k not in HARMLESS_KEYS | LOCATION_KEYS
    }


def differing_keys(a: RecipeConfig, b: RecipeConfig) -> list[str]:
    return list(changed_values(a, b))
