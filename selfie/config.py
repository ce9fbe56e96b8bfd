"""Recipe dataclasses: YAML files plus `--key value` overrides, unknown keys are errors.

A recipe is nested (`train.learning_rate`); an override names the dotted path
(`--train.learning_rate 1e-5`, or `--num_iterations 2` at the top). Values are parsed as YAML
scalars, so `--generate.temperature 0.5` is a float and `--report_to '[wandb]'` a list.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import yaml

from selfie.errors import SelfieError
from selfie.io import read_yaml_mapping

if TYPE_CHECKING:
    from selfie.pairs import PairRules


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f">= {low}"


POSITIVE = ((lambda v: v > 0), "> 0")
NON_NEGATIVE = _at_least(0)
FRACTION = ((lambda v: 0 <= v < 1), "a fraction in [0, 1)")


def cli_number(kind: type, rule: tuple[Callable[[Any], bool], str]) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` within a range rule (the rules recipe keys use), else a usage error."""
    import argparse

    ok, expected = rule

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


class Ranged:
    """A recipe section whose values must lie in range: RANGES maps a field to (test, what it must be).

    Checked when the recipe loads, so a bad value stops the run before anything is written or computed.
    """

    SECTION: ClassVar[str] = ""
    RANGES: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {}

    def __post_init__(self):
        for name, (ok, expected) in self.RANGES.items():
            value = getattr(self, name)
            values = value if isinstance(value, list) else [value]
            if value is not None and not all(ok(v) for v in values):
                raise SelfieError(f"recipe key '{self.SECTION}{name}': expected {'each ' if isinstance(value, list) else ''}"
                                  f"{expected}, got {value!r}")


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # hub id, local directory, .gguf file or built-in alias
    dtype: str = "auto"  # auto = bfloat16 on a GPU that has it, float32 otherwise


@dataclass
class LoraConfig(Ranged):
    SECTION = "lora."
    RANGES = {"r": _at_least(1), "alpha": POSITIVE, "dropout": FRACTION}

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class DataConfig(Ranged):
    SECTION = "data."
    RANGES = {"seed_size": _at_least(0), "iteration_sizes": POSITIVE, "replay": FRACTION}

    prompts: str = "demo"  # prompt pool: hub id, .json/.jsonl/.parquet file, saved dataset dir, or "demo"
    seed_pairs: str | None = None  # labelled preference set for the seed stage, or "alignez" (self-generated, no label); None = labels of the pool's seed slice
    seed_judge: str | None = None  # label the seed slice with this judge instead (2 samples per prompt; see evaluate.py)
    seed_size: float = 2000  # a count, or a fraction of the pool when < 1
    iteration_sizes: list[float] = field(default_factory=lambda: [8000, 20000, 30000])
    shuffle_seed: int = 42
    split: str = "train"  # split name for hub / saved datasets
    replay: float = 0.0  # this fraction of each iteration's training pairs is drawn from the seed pairs (DICE)

    def __post_init__(self):
        super().__post_init__()
        if self.seed_pairs and self.seed_judge:
            raise SelfieError("recipe keys 'data.seed_pairs' and 'data.seed_judge' exclude each other: "
                              "the seed labels come from a labelled set or from a judge")


@dataclass
class GenerateConfig(Ranged):
    SECTION = "generate."
    RANGES = {"num_responses": (lambda v: v >= 2, ">= 2 (a pair needs two responses)"), "temperature": _at_least(0),
              "top_p": ((lambda v: 0 < v <= 1), "a value in (0, 1]"), "max_new_tokens": _at_least(1),
              "batch_size": _at_least(1)}

    num_responses: int = 2
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 300
    batch_size: int = 8


@dataclass
class JudgeConfig(Ranged):
    SECTION = "judge."
    RANGES = {"beta": POSITIVE, "truncation_penalty": _at_least(0), "token_budget": _at_least(1)}

    beta: float = 0.1
    labeller: str = "implicit"  # implicit reward, or any judge spec `selfie eval` takes (reward-model:..., callable:...)
    # Defaults chosen by scripts/bench_quality.py (docs/BENCHMARKS.md "Quality"): of the rules measured,
    # penalize + auto gave SPA's best held-out score over seed-only DPO; drop + 0 (the old rule) its worst.
    truncated: str = "penalize"  # a response cut at the length limit: drop (never chosen) | penalize | keep
    truncation_penalty: float = 1.0  # subtracted from a truncated response's reward under `penalize`
    length_penalty: float | str = "auto"  # alpha: reward - alpha * tokens; "auto" equalises chosen / rejected lengths
    length_normalize: bool = False
    token_budget: int = 8192  # tokens per judging batch (prompt + response, padded)

    def __post_init__(self):
        super().__post_init__()
        self.rules  # noqa: B018 - building the rules validates truncated and length_penalty

    @property
    def rules(self) -> PairRules:
        from selfie.pairs import PairRules

        return PairRules(self.truncated, self.truncation_penalty, self.length_penalty)


@dataclass
class TrainConfig(Ranged):
    SECTION = "train."
    RANGES = {"beta": POSITIVE, "learning_rate": POSITIVE, "warmup_ratio": FRACTION, "num_train_epochs": POSITIVE,
              "seed_epochs": POSITIVE, "per_device_train_batch_size": _at_least(1),
              "gradient_accumulation_steps": _at_least(1), "max_length": _at_least(1), "save_steps": _at_least(1),
              "logging_steps": _at_least(1),
              "adapter_mode": ((lambda v: v in ("continue", "merge")), "'continue' or 'merge'")}

    beta: float = 0.1
    learning_rate: float = 5e-6
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.1
    num_train_epochs: float = 1.0
    seed_epochs: float | None = None  # None = 3 below 2,000 seed pairs, else 1 (SPA)
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    max_length: int | None = 1024
    gradient_checkpointing: bool = False
    save_steps: int = 50
    logging_steps: int = 1
    adapter_mode: str = "continue"  # continue one adapter across iterations, or "merge" and start fresh
    keep_checkpoints: bool = False  # keep iter_t/checkpoints once the stage's adapter is recorded (else deleted)


@dataclass
class RefineConfig(Ranged):
    SECTION = "refine."
    RANGES = {"alpha": ((lambda v: 0 <= v <= 0.5), "a value in [0, 0.5]"),
              "quantile": ((lambda v: 0 < v < 1), "a value in (0, 1)"), "window_steps": _at_least(1),
              "warmup_fraction": ((lambda v: 0 <= v <= 1), "a value in [0, 1]"), "lambdas": _at_least(0)}

    alpha: float = 0.1  # label-smoothing strength for low-confidence pairs; 0 = plain DPO
    quantile: float = 0.1  # K: pairs below this quantile of recent margins are smoothed
    window_steps: int = 50  # margins of the last W optimizer steps form the window
    warmup_fraction: float = 0.2  # no smoothing during this fraction of the steps
    lambdas: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.125])  # DND, per iteration; then halving


@dataclass
class RecipeConfig:
    output_dir: str = "runs/spa"
    run_name: str | None = None
    num_iterations: int = 3
    seed: int = 42
    report_to: list[str] = field(default_factory=lambda: ["wandb"])
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    init: dict[str, Any] | None = None  # representation edit of pi_init: {method: alignez | rahf, ...}
    eval: dict[str, Any] | None = None  # per-iteration evaluation: {judge: ..., prompts: ...}

    def __post_init__(self):
        slices = len(self.data.iteration_sizes)
        if not 0 <= self.num_iterations <= slices:
            raise SelfieError(f"recipe key 'num_iterations': expected 0..{slices} (data.iteration_sizes has {slices} "
                              f"slices), got {self.num_iterations}")


# Keys whose change does not alter a run's results; a resumed run may differ in these.
HARMLESS_KEYS = frozenset({"report_to", "run_name", "train.logging_steps", "train.save_steps", "generate.batch_size", "judge.token_budget",
                           "train.keep_checkpoints"})
# Where the run lives, not what it computes: a moved run directory resumes. Hashes written before it was left out
# still count it (selfie/rundir.py::made_with accepts them).
LOCATION_KEYS = frozenset({"output_dir"})


def _hints(cls: type) -> dict[str, Any]:
    """The recipe keys of a section: its dataclass fields (class constants left out)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) a YAML value against a field's type hint."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except SelfieError:
                continue
        raise SelfieError(f"recipe key '{key}': expected {tp}, got {value!r}")
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise SelfieError(f"recipe key '{key}': expected a mapping, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if origin is list:
        if not isinstance(value, list):
            raise SelfieError(f"recipe key '{key}': expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SelfieError(f"recipe key '{key}': expected a mapping, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-5` as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise SelfieError(f"recipe key '{key}': expected {tp.__name__}, got {value!r}")
    return value


# Keys of earlier versions, with what replaced them.
RENAMED_KEYS = {"judge.allow_truncated_chosen": "judge.truncated (true was 'keep', false 'drop')"}


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = _hints(cls)
    unknown = sorted(set(values) - set(hints))
    for key in unknown:
        if f"{prefix}{key}" in RENAMED_KEYS:
            raise SelfieError(f"recipe key '{prefix}{key}' was replaced by {RENAMED_KEYS[prefix + key]}")
    if unknown:
        raise SelfieError(f"unknown recipe key '{prefix}{unknown[0]}' (known: {', '.join(sorted(hints))})")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in values.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SelfieError(f"override --{dotted}: '{part}' is not a section")
    node[leaf] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`['--train.learning_rate', '1e-5', '--num_iterations=2']` -> a nested dict."""
    tree: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise SelfieError(f"unexpected argument '{arg}': overrides are --key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise SelfieError(f"override --{key} has no value")
            value = args[i + 1]
            i += 1
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise SelfieError(f"override --{key}: not a YAML value ({str(e).splitlines()[0]})") from None
        _set_dotted(tree, key.replace("-", "_"), parsed)
        i += 1
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("init", "eval"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_recipe(path: str | Path | None, overrides: list[str] | dict | None = None) -> RecipeConfig:
    """Build a RecipeConfig from a YAML file (or defaults when path is None) and overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        values = read_yaml_mapping(path, "recipe")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    values = _merge(values, overrides or {})
    try:
        return _build(RecipeConfig, values)
    except SelfieError as e:
        raise SelfieError(f"{path}: {e}" if path is not None else str(e)) from None


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("init", "eval"):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_hash(config: RecipeConfig, leave_out: frozenset[str] = HARMLESS_KEYS | LOCATION_KEYS) -> str:
    """Hash of everything that changes results (HARMLESS_KEYS and LOCATION_KEYS left out)."""
    flat = {k: v for k, v in flatten(to_dict(config)).items() if k not in leave_out}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def changed_values(a: RecipeConfig, b: RecipeConfig) -> dict[str, list[Any]]:
    """{key: [value in a, value in b]} of every results-changing key where they differ."""
    fa, fb = flatten(to_dict(a)), flatten(to_dict(b))
    return {k: [fa.get(k), fb.get(k)] for k in sorted(set(fa) | set(fb))
            if fa.get(k) != fb.get(k) and k not in HARMLESS_KEYS | LOCATION_KEYS}


def differing_keys(a: RecipeConfig, b: RecipeConfig) -> list[str]:
    return list(changed_values(a, b))


def dump_recipe(config: RecipeConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
