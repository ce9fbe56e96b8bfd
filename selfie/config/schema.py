"""The recipe schema: one dataclass per section, every default and every range of a recipe key lives here.

Every section is a `Section`: it checks its own values when built (RANGES for one field's, `check_across` for those
that involve several), so a recipe with a bad value stops before anything is written or computed. Loading YAML and
overrides is selfie/config/loader.py; what makes two recipes the same run is selfie/config/compat.py.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from selfie.errors import SelfieError


class Range(NamedTuple):
    """What the value of one field must be: `test` passes it, `expected` says it. A list is tested item by item,
    unless `whole`."""

    test: Callable[[Any], bool]
    expected: str
    whole: bool = False


def _at_least(low: float) -> Range:
    return Range(lambda v: v >= low, f">= {low}")


POSITIVE = Range(lambda v: v > 0, "> 0")
FRACTION = Range(lambda v: 0 <= v < 1, "a fraction in [0, 1)")
AUTO_OR_NUMBER = Range(lambda v: v == "auto" or not isinstance(v, str), "a number or 'auto'")


class RecipeKeyError(SelfieError):
    """A value a section refuses, naming its recipe keys. The loader, which knows where the section sits (a data
    source is data.prompts[0].), names them again under that prefix (`at`)."""

    def __init__(self, problem: str, names: tuple[str, ...], prefix: str):
        self.problem, self.names = problem, names
        super().__init__(self.at(prefix))

    def at(self, prefix: str) -> str:
        keys = " and ".join(f"'{prefix}{name}'" for name in self.names)
        return f"recipe key{'s' if len(self.names) > 1 else ''} {keys}: {self.problem}"


class Section:
    """A recipe section, checked when built, so a bad value stops the run before anything is written or computed.

    Every section checks the same way: RANGES maps a field to the Range its value must lie in, and `check_across`
    holds the checks that involve more than one field. Errors name the recipe key: SECTION (where the section sits
    in a recipe) and the field.
    """

    SECTION: ClassVar[str] = ""
    RANGES: ClassVar[dict[str, Range]] = {}

    @classmethod
    def out_of_range(cls, name: str, value: Any) -> str | None:
        """What field `name` must be, when `value` is not that (None when it is, or the field has no range)."""
        if name not in cls.RANGES or value is None:
            return None
        test, expected, whole = cls.RANGES[name]
        each = isinstance(value, list) and not whole
        if all(test(v) for v in (value if each else [value])):
            return None
        return f"expected {'each ' if each else ''}{expected}, got {value!r}"

    @classmethod
    def require_in_range(cls, name: str, value: Any) -> None:
        problem = cls.out_of_range(name, value)
        if problem:
            raise RecipeKeyError(problem, (name,), cls.SECTION)

    def __post_init__(self) -> None:
        for name in self.RANGES:
            self.require_in_range(name, getattr(self, name))
        self.check_across()

    def check_across(self) -> None:
        """The checks that involve more than one field (raise `self.refuse(...)`); none by default."""

    def refuse(self, problem: str, *names: str) -> RecipeKeyError:
        """The error naming the keys of fields `names` (of this section) and what is wrong with them."""
        return RecipeKeyError(problem, names, self.SECTION)


ADDED = "added"  # field metadata: a key added after run hashes were first written (see config_hash)


def added(default: Any) -> Any:
    """A field added after run hashes were first written: it enters a recipe's hash only when set off `default`,
    so a recipe that does not use it keeps the hash its run directory records."""
    return field(default=default, metadata={ADDED: True})


@dataclass
class ModelConfig(Section):
    """How every stage that runs the policy loads it (generate, judge, train, eval): from_pretrained's arguments,
    named as TRL's ModelConfig and transformers' BitsAndBytesConfig name them (selfie/models.py::pretrained_options)."""

    SECTION = "model."
    RANGES = {
        "bnb_4bit_quant_type": Range(lambda v: v in ("nf4", "fp4"), "'nf4' or 'fp4'"),
        "bnb_4bit_compute_dtype": Range(
            lambda v: v in ("auto", "float32", "bfloat16", "float16"), "auto, float32, bfloat16 or float16"
        ),
        "chat_template": Range(lambda v: bool(v.strip()), "a Jinja template or a file holding one (null: the tokenizer's own)"),
    }

    name: str = "smollm2-135m"  # hub id, local directory, .gguf file or built-in alias
    dtype: str = "auto"  # auto = bfloat16 on a GPU that has it, float32 otherwise
    revision: str | None = added(None)  # hub branch, tag or commit of `name` (None: main)
    trust_remote_code: bool = added(False)  # run the model's own modelling code from the hub
    attn_implementation: str | None = added(None)  # eager | sdpa | flash_attention_2 | ...; None: transformers' choice
    load_in_4bit: bool = added(False)  # QLoRA: 4-bit base weights (bitsandbytes), LoRA trained on top
    load_in_8bit: bool = added(False)
    bnb_4bit_quant_type: str = added("nf4")
    bnb_4bit_compute_dtype: str | None = added(None)  # None: model.dtype
    use_bnb_nested_quant: bool = added(False)  # quantise the 4-bit quantisation constants too (double quantisation)
    chat_template: str | None = added(None)  # a Jinja chat template, or a file holding one; None: the tokenizer's own

    def check_across(self) -> None:
        if self.load_in_4bit and self.load_in_8bit:
            raise self.refuse("both set; they exclude each other", "load_in_4bit", "load_in_8bit")

    @property
    def quantized(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit

    def unquantised(self, dtype: str) -> ModelConfig:
        """This section loading the full-precision weights in `dtype`: where weights are merged into or edited."""
        return dataclasses.replace(self, dtype=dtype, load_in_4bit=False, load_in_8bit=False)


@dataclass
class LoraConfig(Section):
    SECTION = "lora."
    RANGES = {"r": _at_least(1), "alpha": POSITIVE, "dropout": FRACTION}

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


# The columns a source's `columns` may map to: the ones selfie reads (selfie/data.py's layouts).
SOURCE_COLUMNS = ("prompt_id", "id", "prompt", "instruction", "input", "messages", "chosen", "rejected")


@dataclass
class SourceConfig(Section):
    """One source of a prompt or preference set (an entry of data.prompts / data.seed_pairs given as a list): what
    datasets.load_dataset reads, how its columns map to selfie's, and how much of it a mixture takes (drawn with
    data.shuffle_seed), as alignment-handbook's dataset_mixture entries say. It sits in a list, so its keys have no
    fixed prefix: the loader names them (data.prompts[0].weight)."""

    RANGES = {
        "path": Range(lambda v: isinstance(v, str) and bool(v.strip()), "a hub id, file or directory"),
        "weight": Range(lambda v: 0 < v <= 1, "the fraction of its rows taken, in (0, 1]"),
        "count": _at_least(1),
        "columns": Range(
            lambda v: all(isinstance(column, str) and target in SOURCE_COLUMNS for column, target in v.items()),
            f"a mapping of source columns to columns selfie reads ({', '.join(SOURCE_COLUMNS)})",
        ),
    }

    path: str = ""  # hub id, .json/.jsonl/.parquet file, dataset directory (saved or of data files), or a built-in name
    name: str | None = None  # the dataset's configuration (load_dataset's `name`, the handbook's `config`)
    revision: str | None = None  # hub branch, tag or commit
    data_files: str | list[str] | dict[str, Any] | None = None  # files of the hub repo or directory to read
    data_dir: str | None = None  # a directory inside the hub repo or directory
    split: str | None = None  # None: data.split
    columns: dict[str, str] = field(default_factory=dict)  # source column -> selfie column (SOURCE_COLUMNS)
    weight: float | None = None  # the fraction of the source's rows taken, in (0, 1]
    count: int | None = None  # or how many of its rows are taken

    def check_across(self) -> None:
        if self.weight is not None and self.count is not None:
            raise self.refuse("both set; they exclude each other", "weight", "count")


Sources = str | list[SourceConfig]  # a single hub id / file / directory / built-in name, or a mixture of sources


@dataclass
class DataConfig(Section):
    SECTION = "data."
    RANGES = {
        "prompts": Range(
            lambda v: bool(v) and (not isinstance(v, str) or bool(v.strip())),
            "a source or a non-empty list of sources",
            whole=True,
        ),
        "seed_pairs": Range(
            lambda v: bool(v) and (not isinstance(v, str) or bool(v.strip())),
            "a source or a non-empty list of sources (null: the pool's labels)",
            whole=True,
        ),
        "seed_size": _at_least(0),
        "seed_samples": _at_least(2),
        "iteration_sizes": POSITIVE,
        "replay": FRACTION,
        "system_prompt": Range(lambda v: bool(v.strip()), "a non-empty message (null: none)"),
    }

    prompts: Sources = "demo"  # prompt pool: hub id, .json/.jsonl/.parquet file, dataset dir, "demo", or a list of sources
    seed_pairs: Sources | None = (
        None  # labelled preference set for the seed stage, or "alignez" (self-generated, no label); None = labels of the pool's seed slice
    )
    seed_judge: str | None = None  # label the seed slice with this judge instead (evaluation/judges.py)
    seed_samples: int = added(2)  # seed_judge: samples of pi_init per seed prompt; the pair is the judge's best vs worst
    seed_size: float = 2000  # a count, or a fraction of the pool when < 1
    iteration_sizes: list[float] = field(default_factory=lambda: [8000, 20000, 30000])
    shuffle_seed: int = 42
    split: str = "train"  # split name for hub / saved datasets
    replay: float = 0.0  # this fraction of each iteration's training pairs is drawn from the seed pairs (DICE)
    system_prompt: str | None = added(None)  # the system message of every prompt and seed pair that has none

    def check_across(self) -> None:
        if self.seed_pairs and self.seed_judge:
            raise self.refuse(
                "both set; the seed labels come from a labelled set or from a judge, not both", "seed_pairs", "seed_judge"
            )
        if self.seed_samples != 2 and not self.seed_judge:
            raise self.refuse("set, but only data.seed_judge samples the seed slice", "seed_samples", "seed_judge")


@dataclass
class GenerateConfig(Section):
    SECTION = "generate."
    RANGES = {
        "num_responses": _at_least(1),
        "temperature": _at_least(0),
        "top_p": Range(lambda v: 0 < v <= 1, "a value in (0, 1]"),
        "max_new_tokens": _at_least(1),
        "batch_size": _at_least(1),
        "backend": Range(lambda v: v in ("auto", "static", "continuous", "vllm"), "'auto', 'static', 'continuous' or 'vllm'"),
        "max_num_seqs": _at_least(1),
        "gpu_memory_utilization": Range(lambda v: 0 < v <= 1, "a share of the GPU's memory in (0, 1]"),
    }

    num_responses: int = 2
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 300
    batch_size: int = 8  # sequences decoded together (in flight, for the continuous backend)
    # static: length-sorted batches; continuous: transformers' continuous batching; auto: both sample the first
    # prompts and the faster samples the rest (selfie/generation/generate.py). The same seeds either way. vllm: vLLM's engine
    # in its own environment (selfie/generation/vllm_backend.py): selfie's seeds, vLLM's sampler, so other tokens.
    backend: str = "auto"
    # vLLM's engine, whatever batch_size says: sequences it decodes at once (None: vLLM's own default on a GPU; on CPU,
    # where selfie sizes the KV cache, batch_size) and the share of the GPU's memory it takes (None: 0.9 of what is free
    # when it starts)
    max_num_seqs: int | None = added(None)
    gpu_memory_utilization: float | None = added(None)


TRUNCATION_POLICIES = ("drop", "penalize", "keep")  # what pairing does with a response cut at the length limit
MEMBER_LABELLERS = ("ensemble", "consistency")  # labellers whose judgments carry each member's rewards


@dataclass(frozen=True)
class PairRules:
    """How scored responses become pairs (selfie/labelling/pairs.py): the judge: section's pairing keys, read through
    JudgeConfig.rules (their defaults and ranges are JudgeConfig's)."""

    truncated: str
    truncation_penalty: float
    length_penalty: float | str
    min_margin_quantile: float
    min_agreement: float


@dataclass(frozen=True)
class ImplicitScoring:
    """How the implicit reward scores responses (selfie/labelling/implicit_reward.py), read through JudgeConfig.scoring."""

    length_normalize: bool
    token_budget: int


@dataclass
class JudgeConfig(Section):
    """The recipe's judge: section, the labelling of an iteration's responses. Its keys sit flat in the recipe and
    fall into four concerns, each read by the code that needs it: who scores (`labeller` and its settings), how
    the implicit reward scores (`scoring`), how scores become pairs (`rules`), and the seed stage's label-signal
    check (`signal_folds`)."""

    SECTION = "judge."
    RANGES = {
        "truncated": Range(lambda v: v in TRUNCATION_POLICIES, f"one of {', '.join(TRUNCATION_POLICIES)}"),
        "truncation_penalty": _at_least(0),
        "length_penalty": AUTO_OR_NUMBER,
        "token_budget": _at_least(1),
        "signal_folds": Range(lambda v: v == 0 or v >= 2, "0 (off) or a number of folds >= 2"),
        "min_margin_quantile": FRACTION,
        "bradley_terry_l2": POSITIVE,
        "ensemble_size": _at_least(2),
        "min_agreement": Range(lambda v: 0 <= v <= 1, "a value in [0, 1]"),
    }

    # -- who scores: implicit (beta * (logp_policy - logp_reference), train.beta), bradley-terry (a reward head on
    # pi_init's hidden states, fitted on the seed pairs), ensemble (the mean implicit reward of seed adapters on
    # bootstrap resamples), consistency (the mean implicit reward of the labellers already paid for: pi_{t-1},
    # pi_{t-2} and the label-signal check's fold adapters), or any judge spec `selfie eval` takes (reward-model:...,
    # callable:...): selfie/run/labellers.py
    labeller: str = "implicit"
    bradley_terry_l2: float = added(1.0)  # the bradley-terry head's L2 penalty (selfie/labelling/bradley_terry.py)
    ensemble_size: int = added(4)  # the ensemble labeller's members: seed adapters on bootstrap resamples of the seed
    # -- how scores become pairs (PairRules). Defaults chosen by scripts/quality/benchmark.py (docs/BENCHMARKS.md
    # "Quality"): of the rules measured, penalize + auto gave SPA's best held-out score over seed-only DPO; drop + 0
    # (the old rule) its worst.
    truncated: str = "penalize"  # a response cut at the length limit: drop (never chosen) | penalize | keep
    truncation_penalty: float = 1.0  # subtracted from a truncated response's reward under `penalize`
    length_penalty: float | str = "auto"  # alpha: reward - alpha * tokens; "auto" equalises chosen / rejected lengths
    # Drop the pairs whose shaped margin is below this quantile of the iteration's (0 = keep all; selfie/labelling/pairs.py)
    min_margin_quantile: float = added(0.0)
    # ensemble, consistency or llm-pair: drop the pairs fewer than this share of members (a pairwise judge: of
    # orders) agree on
    min_agreement: float = added(0.0)
    # Temporal Self-Rewarding's anchored rejection: one more sample per prompt from pi_init (adapter off) is every
    # pair's rejected response, the chosen the labeller's best of pi_{t-1}'s
    anchored: bool = added(False)
    # -- how the implicit reward scores (ImplicitScoring)
    length_normalize: bool = False  # per-token log-probs instead of sums
    token_budget: int = 8192  # tokens per scoring batch (prompt + responses, padded)
    # -- the seed stage's label-signal check (selfie/labelling/signal.py): k-fold over the seed pairs, k - 1 extra
    # seed trainings on (k-1)/k of them; 0 = off. 2 costs about one more seed training.
    signal_folds: int = 2

    def check_across(self) -> None:
        if self.min_agreement and not (self.labeller in MEMBER_LABELLERS or self.labeller.startswith("llm-pair:")):
            raise self.refuse(
                "set, but only the ensemble and consistency labellers (their members) and a pairwise judge (its two "
                "orders) can agree",
                "min_agreement",
                "labeller",
            )
        if self.labeller == "consistency" and self.signal_folds < 2:
            raise self.refuse("0, but the consistency labeller's members include the check's fold adapters", "signal_folds")

    @property
    def rules(self) -> PairRules:
        return PairRules(**{f.name: getattr(self, f.name) for f in dataclasses.fields(PairRules)})

    @property
    def scoring(self) -> ImplicitScoring:
        return ImplicitScoring(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ImplicitScoring)})


SEED_CANDIDATE_KEYS = {
    "learning_rate": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v > 0,
    "seed_epochs": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v > 0,
    "target_modules": lambda v: isinstance(v, list) and bool(v) and all(isinstance(m, str) and m for m in v),
}


def _seed_candidate(candidate: Any) -> bool:
    return (
        isinstance(candidate, dict)
        and bool(candidate)
        and all(key in SEED_CANDIDATE_KEYS and SEED_CANDIDATE_KEYS[key](value) for key, value in candidate.items())
    )


@dataclass
class TrainConfig(Section):
    SECTION = "train."
    RANGES = {
        "beta": POSITIVE,
        "learning_rate": POSITIVE,
        "warmup_ratio": FRACTION,
        "num_train_epochs": POSITIVE,
        "seed_epochs": POSITIVE,
        "per_device_train_batch_size": _at_least(1),
        "gradient_accumulation_steps": _at_least(1),
        "global_batch_size": _at_least(1),
        "max_length": _at_least(1),
        "save_steps": _at_least(1),
        "logging_steps": _at_least(1),
        "adapter_mode": Range(lambda v: v in ("continue", "merge"), "'continue' or 'merge'"),
        "seed_candidates": Range(
            lambda v: bool(v) and all(_seed_candidate(c) for c in v),
            "a non-empty list of settings of the seed training, each one or more of learning_rate (> 0), seed_epochs "
            "(> 0) and target_modules (a non-empty list of module names)",
            whole=True,
        ),
    }

    beta: float = 0.1
    learning_rate: float = 5e-6
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.1
    num_train_epochs: float = 1.0
    seed_epochs: float | None = None  # None = 3 below 2,000 seed pairs, else 1 (SPA)
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    # pairs per optimizer step over all processes; set, it decides gradient_accumulation_steps from the launch's process
    # count and the per-device batch (selfie/training/arguments.py::accumulation_steps), so a recipe trains alike on 1 or 8 GPUs
    global_batch_size: int | None = added(None)
    max_length: int | None = 1024
    gradient_checkpointing: bool = False
    save_steps: int = 50
    logging_steps: int = 1
    adapter_mode: str = "continue"  # continue one adapter across iterations, or "merge" and start fresh
    keep_checkpoints: bool = False  # keep iter_t/checkpoints once the stage's adapter is recorded (else deleted)
    # Other settings of the seed training to try besides the recipe's own ({learning_rate, seed_epochs,
    # target_modules}); the label-signal check runs with each and the seed adapter is trained with the one whose
    # held-out accuracy is highest (selfie/run/seed_choice.py). Each costs a check's k fold trainings.
    seed_candidates: list[dict[str, Any]] | None = added(None)
    # Every other field of the trainer's arguments (TRL's DPOConfig, transformers' TrainingArguments) a recipe sets,
    # by its own name beside the keys above (train.optim, train.weight_decay, ...): checked against the dataclass
    # when the recipe loads (trainer_arguments). Only the fields set are held, so they alone enter the hash.
    EXTRA: ClassVar[str] = "trainer_args"
    trainer_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class RefineConfig(Section):
    SECTION = "refine."
    RANGES = {
        "alpha": Range(lambda v: 0 <= v <= 0.5, "a value in [0, 0.5]"),
        "quantile": Range(lambda v: 0 < v < 1, "a value in (0, 1)"),
        "window_steps": _at_least(1),
        "warmup_fraction": Range(lambda v: 0 <= v <= 1, "a value in [0, 1]"),
        "lambdas": _at_least(0),
    }

    alpha: float = 0.1  # label-smoothing strength for low-confidence pairs; 0 = plain DPO
    quantile: float = 0.1  # K: pairs below this quantile of recent margins are smoothed
    window_steps: int = 50  # margins of the last W optimizer steps form the window
    warmup_fraction: float = 0.2  # no smoothing during this fraction of the steps
    lambdas: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.125])  # DND, per iteration; then halving
    # A pair with an `agreement` C (judge.labeller ensemble, consistency or llm-pair:) is trained on the soft label C:
    # eps >= 1 - C
    soft_agreement: bool = added(False)


# init.layers / init.target_layers: which decoder layers an edit touches
LAYERS = Range(
    lambda v: v == "auto" or (isinstance(v, list) and bool(v)), "'auto' or a non-empty list of layer indices", whole=True
)


@dataclass
class EditConfig(Section):
    """The `init:` section: a representation edit builds pi_init. Settings both edits share; `method` picks the class."""

    SECTION = "init."
    RANGES = {
        "held_out": Range(lambda v: 0 < v < 1, "a fraction in (0, 1)"),
        "num_prompts": _at_least(2),
        "max_new_tokens_resp": _at_least(1),
        "batch_size": _at_least(1),
    }

    method: str = ""  # alignez | rahf (INIT_METHODS)
    prompts: str = "demo"  # prompt source (see selfie.data.load_prompts); a seeded sample of num_prompts is used
    num_prompts: int = 32
    max_new_tokens_resp: int = 200
    temperature: float = 0.7
    batch_size: int = 8  # sequences per generate / forward batch
    dtype: str = "auto"
    # share of the self-generated data the edit is not fitted on: AlignEZ ranks layers and chooses n_layers and
    # alpha on it, RAHF measures its representation loss on it
    held_out: float = 0.25

    @classmethod
    def variant(cls, values: dict, key: str) -> type[EditConfig]:
        """The class of an `init:` mapping, by its `method`."""
        method = values.get("method")
        if method not in INIT_METHODS:
            raise SelfieError(f"recipe key '{key}.method': expected one of {', '.join(INIT_METHODS)}, got {method!r}")
        return INIT_METHODS[method]


@dataclass
class AlignEZConfig(EditConfig):
    RANGES = {
        **EditConfig.RANGES,
        "keywords": Range(
            lambda v: bool(v) and all(len(p) == 2 and all(isinstance(k, str) and k.strip() for k in p) for p in v),
            "a non-empty list of [positive, negative] keyword pairs",
            whole=True,
        ),
        "location": Range(
            lambda v: v == "mlp",
            "'mlp' (pi_init is a folded standalone model, and only the MLP output folds exactly into its weights; "
            "docs/EDITING.md)",
        ),
        "layers": LAYERS,
        "n_layers": Range(lambda v: v == "auto" or (not isinstance(v, str) and v >= 1), "'auto' or a number >= 1"),
        "alpha": AUTO_OR_NUMBER,
        "parallel_cosine": Range(lambda v: 0 < v <= 1, "a cosine in (0, 1]"),
        "max_kl": _at_least(0),
    }

    method: str = "alignez"
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


@dataclass
class RAHFConfig(EditConfig):
    RANGES = {**EditConfig.RANGES, "steps": _at_least(1), "train_batch_size": _at_least(1), "target_layers": LAYERS}

    method: str = "rahf"
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


INIT_METHODS: dict[str, type[EditConfig]] = {"alignez": AlignEZConfig, "rahf": RAHFConfig}


BASELINES = ("init", "seed", "previous", "none")  # what an iteration is compared against (eval.baseline)


@dataclass
class EvalConfig(Section):
    """The `eval:` section: each iteration's policy against a baseline on held-out prompts, scored by a judge."""

    SECTION = "eval."
    RANGES = {
        "num_prompts": _at_least(0),
        "max_new_tokens": _at_least(1),
        "temperature": _at_least(0),
        "n_boot": _at_least(1),
        "baseline": Range(lambda v: v in BASELINES, f"one of {', '.join(BASELINES)}"),
    }

    judge: str | None = None  # required: a judge spec (selfie/evaluation/judges.py)
    prompts: str = "demo"  # prompt source; the run's own pool means its held-out slice
    split: str | None = None  # dataset split; None = the run's data.split
    num_prompts: int = 16  # 0 = all
    max_new_tokens: int = 64
    temperature: float | None = None  # None = the run's generate.temperature
    baseline: str = "init"  # pi_init, the seed adapter, the previous iteration, or none (a mean score)
    n_boot: int = 2000

    def check_across(self) -> None:
        if not self.judge:  # the one required key: None elsewhere means "the default"
            raise self.refuse("required when 'eval' is set (e.g. reward-model:PATH)", "judge")
        if self.judge.startswith("llm-pair:") and self.baseline == "none":
            raise self.refuse("a pairwise judge needs a baseline to compare with, not 'none'", "baseline", "judge")


@dataclass
class ValidationConfig(Section):
    """The `validation:` section: seed pairs held out of every training, on which each iteration's policy is
    validated (the validate stage, docs/METHOD.md section 1.8), and the stop rule read from it."""

    SECTION = "validation."
    RANGES = {
        "pairs": POSITIVE,
        "prompts": _at_least(0),
        "n_boot": _at_least(1),
        "max_length_change": POSITIVE,
        "max_kl": POSITIVE,
    }

    pairs: float = 0.1  # seed pairs held out of the seed training: a count, or a fraction of the seed pairs when < 1
    prompts: int = 0  # prompts the pool holds out (beyond the iterations' slices) sampled for drift; 0: the pairs' prompts
    n_boot: int = EvalConfig.n_boot
    stop: bool = True  # stop the loop when an iteration fails a check below (False: report the checks only)
    max_length_change: float | None = 0.3  # mean response length against pi_init's: stop beyond +-30%
    max_kl: float | None = None  # stop when the KL(pi_t || pi_init) estimate (nats per response) exceeds this


@dataclass(frozen=True)
class EvalOptions(Section):
    """The options of `selfie eval` (not a recipe section): which prompts, how each model answers, the bootstrap."""

    RANGES = {
        "num_prompts": _at_least(0),
        "num_pairs": _at_least(0),
        "max_new_tokens": _at_least(1),
        "temperature": _at_least(0),
        "top_p": GenerateConfig.RANGES["top_p"],
        "batch_size": _at_least(1),
        "backend": GenerateConfig.RANGES["backend"],
        "n_boot": _at_least(1),
    }

    split: str = DataConfig.split  # for hub / saved datasets
    num_prompts: int = 32  # first N prompts (0 = all)
    num_pairs: int = 0  # accuracy: first N pairs (0 = all)
    max_new_tokens: int = 256
    temperature: float = GenerateConfig.temperature  # 0 = greedy
    top_p: float = GenerateConfig.top_p
    batch_size: int = GenerateConfig.batch_size  # sequences decoded together
    backend: str = GenerateConfig.backend  # generation backend (selfie/generation/generate.py)
    seed: int = 0  # sampling and bootstrap seed
    dtype: str = ModelConfig.dtype
    n_boot: int = EvalConfig.n_boot  # bootstrap resamples for the 95% interval

    def sampling(self) -> dict[str, Any]:
        """How each model answers: the arguments of selfie.generation.generate.generate_responses."""
        return dict(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            batch_size=self.batch_size,
            backend=self.backend,
        )


@dataclass
class RecipeConfig(Section):
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
    init: EditConfig | None = None  # representation edit of pi_init: {method: alignez | rahf, ...}
    eval: EvalConfig | None = None  # per-iteration evaluation: {judge: ..., prompts: ...}
    validation: ValidationConfig | None = added(None)  # held-out seed pairs, drift checks, the stop rule: {pairs: 0.1}

    def check_across(self) -> None:
        if self.generate.num_responses < 2:  # `selfie generate` may sample one; the loop makes pairs
            raise self.refuse(
                f"expected >= 2 (a pair needs two responses), got {self.generate.num_responses}", "generate.num_responses"
            )
        if self.train.seed_candidates and self.judge.signal_folds < 2:
            raise self.refuse(
                "set, but the candidates are chosen by the label-signal check", "train.seed_candidates", "judge.signal_folds"
            )
        slices = len(self.data.iteration_sizes)
        if not 0 <= self.num_iterations <= slices:
            raise self.refuse(
                f"expected 0..{slices} (data.iteration_sizes has {slices} slices), got {self.num_iterations}", "num_iterations"
            )


def section_fields(cls: type) -> dict[str, Any]:
    """The recipe keys of a section: its dataclass fields (class constants, and the field holding its EXTRA keys, left out)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name != getattr(cls, "EXTRA", None)}


def is_section_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def is_enum(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, enum.Enum)


def union_members(tp: Any) -> list[Any]:
    """The types a field may hold, None left out: (int | None) -> [int]; int -> [int]."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [arg for arg in typing.get_args(tp) if arg is not type(None)]
    return [tp]


def shape_of(tp: Any) -> type | None:
    """The container a list or section member of a union holds (data.prompts: a string, or a list of sources)."""
    if typing.get_origin(tp) is list:
        return list
    return dict if is_section_type(tp) else None


def to_dict(config: Any) -> dict:
    """The config as plain nested values; a section's EXTRA keys (train's trainer arguments) sit beside its own."""
    values = dataclasses.asdict(config)
    for f in dataclasses.fields(config):
        extra = getattr(getattr(config, f.name), "EXTRA", None)
        if extra:
            values[f.name].update(values[f.name].pop(extra))
    return values
