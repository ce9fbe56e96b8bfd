"""Run compatibility: which recipe keys change a run's results, the config hash, and run directories written by
earlier versions (schema_version and the upgrade from each layout to the next)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from selfie.config.loader import build_recipe
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
        "generate.max_num_seqs",  # the vLLM engine's size: the same seeds, the same draws
        "generate.gpu_memory_utilization",
        "judge.token_budget",
        "judge.signal_folds",  # a check reported in the seed stage's metrics: adapters and pairs are the same
        "train.keep_checkpoints",
        "train.ddp_timeout",  # how long ranks wait for each other
        "validation.n_boot",  # the stop rule's intervals and bounds: they decide whether more iterations run,
        "validation.stop",  # not what the done ones made
        "validation.max_length_change",
        "validation.max_kl",
    }
)
# Where the run lives, not what it computes: a moved run directory resumes. Hashes written before it was left out
# still count it (schema_version 1, upgraded by _v1_to_v2).
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
#
# A run directory's manifest records the schema_version of the layout that wrote it; one written before the
# manifest kept it has none: version 0. It is brought to SCHEMA_VERSION one step per version (UPGRADES[k]: from
# version k to k + 1). A step takes the config.yaml values as version k wrote them to version k + 1's form and,
# given the recipe the run is resumed with, the manifest's hash: when it is version k's hash of that recipe, it
# becomes version k + 1's. A hash no step recognises (the run was made with another recipe) goes on unchanged,
# and the recipe check (selfie/run/rundir.py::check_recipe) refuses it.


@dataclass
class RunState:
    """What a run directory says of the recipe it was made with, in the form of one layout."""

    values: dict  # config.yaml
    config_hash: str | None  # the manifest's (None: no manifest yet)
    not_reproduced: list[str] = field(default_factory=list)  # what this version would not reproduce of the run


def _v0_to_v1(run: RunState, config: RecipeConfig | None) -> RunState:
    """Version 0 (af5b61e and before) -> 1 (2677ab8): `judge.beta` is dropped (the implicit reward is scored with
    train.beta: a run judged with another beta is named as not reproduced), `init` and `eval` become typed sections.
    Version 0 hashed config.yaml as written (init and eval whole, judge.beta and output_dir counted, 2000 told
    from 2000.0), so then config.yaml is the run's recipe."""
    values, not_reproduced = copy.deepcopy(run.values), list(run.not_reproduced)
    judge, train = values.get("judge"), values.get("train")
    if isinstance(judge, dict) and "beta" in judge:
        judged_with = judge.pop("beta")
        trains_with = train.get("beta", TrainConfig.beta) if isinstance(train, dict) else TrainConfig.beta
        if judged_with != trains_with:
            not_reproduced.append(
                f"judge.beta (the run judged with beta {judged_with}; this version judges with train.beta, {trains_with})"
            )
    recorded = run.config_hash
    written_as_v0 = _hash(flatten(run.values, whole=("init", "eval")), HARMLESS_KEYS, exact_numbers=True)
    if config is not None and recorded == written_as_v0 and not changed_values(build_recipe(values), config):
        recorded = _v1_hash(RunState(values, recorded), config)
    return RunState(values, recorded, not_reproduced)


def _v1_hash(run: RunState, config: RecipeConfig) -> str:
    """Version 1's hash of `config`: output_dir counted (the run's own), 2000 told from 2000.0."""
    moved_back = dataclasses.replace(config, output_dir=build_recipe(run.values).output_dir)
    return config_hash(moved_back, leave_out=HARMLESS_KEYS, exact_numbers=True)


def _v1_to_v2(run: RunState, config: RecipeConfig | None) -> RunState:
    """Version 1 -> 2 (66a0391): output_dir leaves the hash (LOCATION_KEYS), so a moved run directory resumes."""
    return _rehash(run, config, lambda c: _v1_hash(run, c), lambda c: config_hash(c, exact_numbers=True))


def _v2_to_v3(run: RunState, config: RecipeConfig | None) -> RunState:
    """Version 2 -> 3 (015c374, up to the bce4546 release): equal numbers hash alike (a float field's default 2000
    and the 2000.0 config.yaml gives back)."""
    return _rehash(run, config, lambda c: config_hash(c, exact_numbers=True), config_hash)


def _v3_to_v4(run: RunState, config: RecipeConfig | None) -> RunState:
    """Version 3 -> 4: the manifest records its schema_version; values and hash are unchanged."""
    return run


def _rehash(
    run: RunState, config: RecipeConfig | None, old: Callable[[RecipeConfig], str], new: Callable[[RecipeConfig], str]
) -> RunState:
    """`run` with its hash made the next version's way (`new`) when it is this version's (`old`) of `config`."""
    if config is None or run.config_hash is None or run.config_hash != old(config):
        return run
    return dataclasses.replace(run, config_hash=new(config))


UPGRADES: list[Callable[[RunState, RecipeConfig | None], RunState]] = [_v0_to_v1, _v1_to_v2, _v2_to_v3, _v3_to_v4]
SCHEMA_VERSION = len(UPGRADES)  # the layout this version writes


def upgrade_run(run: RunState, version: int, config: RecipeConfig | None = None) -> RunState:
    """`run`, written by layout `version`, in this version's form; its hash too when `config`, the recipe it is
    resumed with, is given."""
    for step in UPGRADES[version:]:
        run = step(run, config)
    return run


def made_with(run: RunState, previous: RecipeConfig | None, config: RecipeConfig) -> bool:
    """Whether the run (upgraded with `config`) was made with `config`'s results-changing values. The manifest's
    hash decides (config.yaml is its readable copy; a kill during --force can leave it stale); with no manifest
    yet, config.yaml (`previous`) does."""
    if run.config_hash is None:
        return previous is None or not changed_values(previous, config)
    return run.config_hash == config_hash(config)


def changed_values(a: RecipeConfig, b: RecipeConfig) -> dict[str, list[Any]]:
    """{key: [value in a, value in b]} of every results-changing key where they differ."""
    fa, fb = flatten(to_dict(a)), flatten(to_dict(b))
    return {
        k: [fa.get(k), fb.get(k)]
        for k in sorted(set(fa) | set(fb))
        if fa.get(k) != fb.get(k) and k not in HARMLESS_KEYS | LOCATION_KEYS
    }
