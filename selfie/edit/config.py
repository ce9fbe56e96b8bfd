"""The recipe's `init:` mapping: which edit builds pi_init, and its settings. Unknown keys are errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from selfie.config import _build as build_dataclass  # the recipe loader's checked construction (types, unknown keys)
from selfie.errors import SelfieError


@dataclass
class EditConfig:
    """Settings both edits share: the prompts they generate from and how they sample."""

    prompts: str = "demo"  # prompt source (see selfie.data.load_prompts); a seeded sample of num_prompts is used
    num_prompts: int = 32
    max_new_tokens_resp: int = 200
    temperature: float = 0.7
    batch_size: int = 8  # sequences per generate / forward batch
    dtype: str = "auto"
    # share of the self-generated data the edit is not fitted on: AlignEZ ranks layers and chooses n_layers and
    # alpha on it, RAHF measures its representation loss on it
    held_out: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.held_out < 1:
            raise SelfieError(f"init.held_out: expected a fraction in (0, 1), got {self.held_out}")
        if self.num_prompts < 2:
            raise SelfieError(f"init.num_prompts: need at least 2, got {self.num_prompts}")
        for key in ("max_new_tokens_resp", "batch_size"):
            if getattr(self, key) < 1:
                raise SelfieError(f"init.{key}: must be >= 1, got {getattr(self, key)}")

    def _check_layers(self, key: str) -> None:
        value = getattr(self, key)
        if isinstance(value, str) and value != "auto":
            raise SelfieError(f"init.{key}: expected 'auto' or a list of layer indices, got '{value}'")
        if isinstance(value, list) and not value:
            raise SelfieError(f"init.{key}: the list of layers is empty")


@dataclass
class AlignEZConfig(EditConfig):
    keywords: list[list[str]] = field(default_factory=lambda: [["helpful", "harmful"]])
    max_new_tokens_char: int = 50
    finder: str = "svd"  # a name in selfie.edit.directions.FINDERS
    finder_options: dict[str, Any] = field(default_factory=dict)  # e.g. {variance: 0.9} for top-k SVD
    location: str = "mlp"  # mlp: MLP output (foldable into down_proj); layer: decoder-layer output (hooks only)
    layers: str | list[int] = "auto"
    n_layers: int | str = "auto"  # auto: 1, 3 or 5 of the best layers, whichever does best on the held-out pairs
    alpha: float | str = "auto"  # auto: 0.5, 1, 2 or 4, likewise
    parallel_cosine: float = 0.9  # |cos(u+, u-)| above this: boost the direction separating y+ from y- instead
    max_kl: float = 0.05  # nats per token the edit may lower the model's own held-out plain answers' log-prob by

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_layers("layers")
        for i, pair in enumerate(self.keywords):
            if len(pair) != 2 or not all(isinstance(k, str) and k.strip() for k in pair):
                raise SelfieError(f"init.keywords[{i}]: expected [positive, negative] keywords, got {pair!r}")
        if not self.keywords:
            raise SelfieError("init.keywords: need at least one [positive, negative] pair")
        if self.location != "mlp":
            raise SelfieError(f"init.location '{self.location}': pi_init is a folded standalone model, and only the MLP "
                              "output ('mlp') folds exactly into the weights (see docs/EDITING.md)")
        if self.max_kl < 0:
            raise SelfieError(f"init.max_kl: must be >= 0, got {self.max_kl}")
        if not 0 < self.parallel_cosine <= 1:
            raise SelfieError(f"init.parallel_cosine: expected a cosine in (0, 1], got {self.parallel_cosine}")
        for key in ("n_layers", "alpha"):
            value = getattr(self, key)
            if isinstance(value, str) and value != "auto":
                raise SelfieError(f"init.{key}: expected 'auto' or a number, got '{value}'")
        if self.n_layers != "auto" and self.n_layers < 1:
            raise SelfieError(f"init.n_layers: must be >= 1, got {self.n_layers}")


@dataclass
class RAHFConfig(EditConfig):
    # 150 steps at 1e-3: on SmolLM2-135M the held-out representation loss fell 52.4 -> 42.5 in 100 steps at 1e-3 and
    # had levelled off (3e-3: 42.3; the reference's 3e-4: 44.3), at a third of the reference's 450 steps (docs/EDITING.md)
    steps: int = 150
    alpha: float = 5.0
    learning_rate: float = 1e-3
    train_batch_size: int = 4
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    target_layers: str | list[int] = "auto"  # auto: every other layer from 30% to 60% of the depth

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_layers("target_layers")
        if self.steps < 1 or self.train_batch_size < 1:
            raise SelfieError("init.steps and init.train_batch_size must be >= 1")


METHODS: dict[str, type[EditConfig]] = {"alignez": AlignEZConfig, "rahf": RAHFConfig}


def parse_init(init: dict[str, Any]) -> tuple[str, EditConfig]:
    """(method, its config) from an `init:` mapping such as {method: alignez, num_prompts: 32, ...}."""
    if not isinstance(init, dict):
        raise SelfieError(f"init: expected a mapping, got {type(init).__name__}")
    values = dict(init)
    method = values.pop("method", None)
    if method not in METHODS:
        raise SelfieError(f"init.method: expected one of {', '.join(METHODS)}, got {method!r}")
    return method, build_dataclass(METHODS[method], values, prefix="init.")


def as_dict(config: EditConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
