"""What `selfie run` checks before it writes anything, and the plan `selfie run --dry-run` prints.

For the stages the manifest does not hold yet: the output directory can be written; the model's config loads
(no weights) and holds every LoRA target module; the dtype is known, the attention implementation and the
quantisation can run here (their packages, this device), and TRL takes the trainer settings; the `init:`
and `eval:` sections are valid; every data source a remaining stage reads loads and is well formed, with
prompts for every slice; every judge spec (data.seed_judge, judge.labeller, eval.judge) imports and loads
without a model being run. Only then does the run write config.yaml (selfie/run/rundir.py::open_run), so a
failure here leaves no run directory behind.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import jinja2
import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase, SchedulerType
from transformers.pytorch_utils import Conv1D
from transformers.quantizers import AutoHfQuantizer

from selfie.config.schema import AlignEZConfig, ModelConfig, RecipeConfig, TrainConfig
from selfie.data import Splits, describe_sources, load_prompts, pool_prompts, seed_preferences, split_prompts
from selfie.dist import trainer_scope, world_size
from selfie.errors import SelfieError
from selfie.evaluation.compare import eval_prompts
from selfie.evaluation.judges import check_judge
from selfie.generation import vllm_backend
from selfie.io import check_writable
from selfie.models import (
    default_device,
    load_model_config,
    load_tokenizer,
    pretrained_options,
    quantization_config,
    resolve_dtype,
)
from selfie.run.guard import stopped_line
from selfie.run.labellers import LABELLERS
from selfie.run.plan import EVAL, GENERATE, INIT, JUDGE, SEED, TRAIN, VALIDATE
from selfie.run.rundir import CHECKPOINTS, RunContext, check_recipe
from selfie.run.validation import held_out_count
from selfie.tokens import chat_ids
from selfie.training.arguments import accumulation_steps, build_dpo_config, dnd_lambda, seed_epochs


@dataclass
class Step:
    iteration: int
    stage: str
    work: str  # what the stage will do: prompts, responses, new tokens, pairs, optimizer steps
    done: bool


@dataclass
class Plan:
    config: RecipeConfig
    steps: list[Step]
    inputs: list[str]  # one line per input: what it is and what it holds
    splits: Splits | None  # the prompt pool's slices, when a remaining stage reads them


def preflight(config: RecipeConfig, done: set[tuple[int, str]] | frozenset = frozenset()) -> Plan:
    """Check everything the stages not in `done` need; returns their plan. Raises SelfieError naming the fault."""
    check_writable(config.output_dir, directory=True)
    steps = RunContext.for_recipe(config).plan
    todo = [step for step in steps if step not in done]
    stages = {stage for _, stage in todo}
    inputs, sizes, splits = [], {}, None
    tokenizer = None
    if todo:
        inputs.append(check_model(config))
        tokenizer = check_tokenizer(config, inputs)
        check_trainer(config)
        inputs.append(f"training   {batch_geometry(config.train, world_size())}")
    samples = {GENERATE.name, EVAL.name, VALIDATE.name} | ({SEED.name} if config.data.seed_judge else set())  # they generate
    if config.generate.backend == "vllm" and stages & samples:
        inputs.append(check_vllm())
    if (0, INIT.name) in todo:
        inputs.append(check_init(config))
    drift_from_pool = VALIDATE.name in stages and config.validation.prompts
    if stages & {SEED.name, GENERATE.name, EVAL.name} or drift_from_pool:
        splits = prompt_pool(config, inputs)
    if (0, SEED.name) in todo:
        seed_prompts = check_seed(config, splits, inputs)
        sizes[SEED.name] = None if seed_prompts is None else len(seed_prompts)
        if config.validation and sizes[SEED.name] is not None:
            sizes[VALIDATE.name] = held_out_count(config.validation, sizes[SEED.name])
            sizes[SEED.name] -= sizes[VALIDATE.name]
        check_signal_folds(config, sizes[SEED.name])
        check_max_length(config, tokenizer, seed_prompts or [], "the seed pairs")
    if VALIDATE.name in stages:
        check_validation(config, sizes.get(VALIDATE.name), splits, inputs)
    for t in sorted({t for t, stage in todo if stage == GENERATE.name} if splits is not None else ()):
        splits.iterations[t - 1] = fitting(config, tokenizer, splits.iterations[t - 1], f"iteration {t}'s slice", inputs)
    if stages & {SEED.name, JUDGE.name} and config.judge.labeller not in LABELLERS:  # the signal check judges in the seed stage
        check_judge_spec(config.judge.labeller, "judge.labeller", inputs)
    if EVAL.name in stages:
        sizes[EVAL.name] = check_eval(config, inputs)
    if splits is not None:
        sizes.update({t: len(rows) for t, rows in enumerate(splits.iterations, 1)})
    return Plan(config, [Step(t, stage, work(config, t, stage, sizes), (t, stage) in done) for t, stage in steps], inputs, splits)


def dry_run(config: RecipeConfig, force: bool) -> str:
    """The plan of `selfie run --dry-run`: everything a real run checks first (the recipe against an existing
    run's, its recorded artifacts, then preflight), nothing written."""
    ctx = RunContext.for_recipe(config)
    run_dir, manifest = ctx.run_dir, ctx.manifest()
    if run_dir.is_dir():
        check_recipe(run_dir, config, manifest, force)
        manifest.verify(record_new=False)
    text = plan_text(preflight(config, manifest.done_steps()), run_dir.is_dir())
    return text + (f"\n{stopped_line(manifest.stopped)}" if manifest.stopped and not force else "")


# ---- checks ---------------------------------------------------------------------------------------


def check_model(config: RecipeConfig) -> str:
    """The model's config loads and every lora.target_modules entry names a module of it (as PEFT matches them)."""
    resolve_dtype(config.model.dtype)
    check_quantization(config.model)
    model_config = load_model_config(config.model.name, config.model)
    modules = dict(model_skeleton(config.model, model_config).named_modules())
    targets = config.lora.target_modules
    if not targets:
        raise SelfieError("recipe key 'lora.target_modules': the list is empty")
    adaptable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)  # what LoRA can wrap
    for target in targets:
        matched = [m for name, m in modules.items() if name == target or name.endswith("." + target)]
        if not any(isinstance(m, adaptable) for m in matched):
            known = sorted({name.rsplit(".", 1)[-1] for name, m in modules.items() if isinstance(m, torch.nn.Linear)})
            what = f"is a {type(matched[0]).__name__}, which LoRA cannot adapt," if matched else "matches no module"
            raise SelfieError(
                f"recipe key 'lora.target_modules': '{target}' {what} in model '{config.model.name}' "
                f"(its linear layers: {', '.join(known)})"
            )
    quantized = " (4-bit base: QLoRA)" if config.model.load_in_4bit else " (8-bit base)" if config.model.load_in_8bit else ""
    return (
        f"model      {config.model.name} ({model_config.model_type}), LoRA r {config.lora.r} on {', '.join(targets)}{quantized}"
    )


def model_skeleton(settings: ModelConfig, model_config: PretrainedConfig) -> torch.nn.Module:
    """The model's module tree without weights, built as model.attn_implementation and model.trust_remote_code say
    (transformers refuses an attention implementation this machine cannot run: flash-attn not installed, ...)."""
    options = {k: v for k, v in pretrained_options(settings).items() if k in ("attn_implementation", "trust_remote_code")}
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(model_config, **options)
    except (ImportError, ValueError) as e:
        key = "model.attn_implementation" if "attn_implementation" in options else "model.name"
        raise SelfieError(f"recipe key '{key}': {_first_line(e)}") from None


def check_quantization(settings: ModelConfig) -> None:
    """model.load_in_4bit / load_in_8bit can run here: bitsandbytes is installed and has a backend for this device
    (transformers' own check of the quantiser, which from_pretrained would run after downloading the weights)."""
    if not settings.quantized:
        return
    key = "model.load_in_4bit" if settings.load_in_4bit else "model.load_in_8bit"
    if not installed("bitsandbytes"):
        raise SelfieError(f"recipe key '{key}': quantised loading needs bitsandbytes (pip install bitsandbytes)")
    try:
        AutoHfQuantizer.from_config(quantization_config(settings)).validate_environment(device_map={"": str(default_device())})
    except (ImportError, RuntimeError, ValueError) as e:
        raise SelfieError(f"recipe key '{key}': cannot quantise on {default_device()} here: {_first_line(e)}") from None


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def check_tokenizer(config: RecipeConfig, inputs: list[str]) -> PreTrainedTokenizerBase:
    """The tokenizer loads with a chat template (model.chat_template, else its own) that renders a conversation."""
    tokenizer = load_tokenizer(config.model.name, config.model)
    key = "model.chat_template" if config.model.chat_template else "model.name"
    try:
        chat_ids(tokenizer, [{"role": "user", "content": "Hello?"}], add_generation_prompt=True)
    except (jinja2.TemplateError, ValueError, TypeError) as e:  # a syntax or render error, raise_exception() on a role
        raise SelfieError(f"recipe key '{key}': the chat template cannot render a conversation ({_first_line(e)})") from None
    system = f"; system prompt {config.data.system_prompt!r:.60}" if config.data.system_prompt else ""
    source = "model.chat_template" if config.model.chat_template else "the tokenizer's own"
    inputs.append(f"template   {source}{system}")
    return tokenizer


def check_max_length(config: RecipeConfig, tokenizer: PreTrainedTokenizerBase, prompts: list[list[dict]], what: str) -> None:
    """Refuse a train.max_length that TRL would drop every pair of a stage for: with keep_start truncation a pair whose
    prompt alone fills max_length is dropped (trainer.py::_prepare_dataset). Prompts are tried shortest text first,
    so a fitting max_length costs a few encodings."""
    limit = config.train.max_length
    if limit is None or not prompts or config.train.trainer_args.get("truncation_mode", "keep_start") != "keep_start":
        return
    shortest = None
    for prompt in sorted(prompts, key=lambda p: sum(len(m["content"]) for m in p)):
        length = len(chat_ids(tokenizer, prompt, add_generation_prompt=True))
        if length < limit:
            return
        shortest = length if shortest is None else min(shortest, length)
    raise SelfieError(
        f"recipe key 'train.max_length': {limit} tokens leave no room for a response after any prompt of {what} "
        f"(the shortest is {shortest} tokens), so TRL would drop every pair"
    )


def fitting(
    config: RecipeConfig, tokenizer: PreTrainedTokenizerBase, rows: list[dict], what: str, inputs: list[str]
) -> list[dict]:
    """The rows of a prompt slice whose prompt leaves room for a response: fewer tokens than train.max_length (under
    keep_start truncation TRL drops a pair whose prompt fills it, after its generation and judging were paid for)
    and, with generate.max_new_tokens after it, within the model's positions. The others are left out, counted and
    the first named in the plan; a slice with none left is refused. Only prompts long enough in bytes to come near a
    limit are tokenised (a token holds at least one byte)."""
    limits = []
    if config.train.max_length is not None and config.train.trainer_args.get("truncation_mode", "keep_start") == "keep_start":
        limits.append((config.train.max_length, f"train.max_length {config.train.max_length} leaves no room for a response"))
    positions = getattr(load_model_config(config.model.name, config.model).get_text_config(), "max_position_embeddings", None)
    if positions:
        room = positions - config.generate.max_new_tokens
        limits.append((room, f"with generate.max_new_tokens it exceeds the model's {positions} positions"))
    if not limits or not rows:
        return rows
    overhead = len(chat_ids(tokenizer, [{"role": "user", "content": ""}], add_generation_prompt=True)) + 64
    kept, left_out = [], []
    for row in rows:
        near = sum(len(m["content"].encode()) + overhead for m in row["prompt"]) >= min(limit for limit, _ in limits)
        length = len(chat_ids(tokenizer, row["prompt"], add_generation_prompt=True)) if near else 0
        why = next((reason for limit, reason in limits if length >= limit), None)
        (left_out if why else kept).append((row, length, why))
    if not left_out:
        return rows
    first, length, why = left_out[0]
    line = f"{len(left_out)} of {len(rows)} prompts of {what} left out: {why} (the first: prompt_id {first['prompt_id']}, {length} tokens)"
    if not kept:
        raise SelfieError(f"{line}; none is left")
    inputs.append(f"prompts    {line}")
    return [row for row, _, _ in kept]


def check_validation(config: RecipeConfig, pairs: int | None, splits: Splits | None, inputs: list[str]) -> None:
    """The held-out prompts `validation.prompts` asks for exist beyond the seed and iteration slices."""
    v = config.validation
    if v.prompts and v.prompts > len(splits.held_out):
        raise SelfieError(
            f"recipe key 'validation.prompts': {v.prompts} wanted, but the pool holds out only {len(splits.held_out)} "
            "beyond the seed and iteration slices; ask for fewer, or 0 to sample the held-out pairs' prompts"
        )
    held = f"{pairs} seed pairs held out of training" if pairs is not None else "the seed pairs held out of training"
    drift = f"{v.prompts} held-out prompts of the pool" if v.prompts else "their prompts"
    rule = "stops the loop on a failed check" if v.stop else "reports its checks only"
    inputs.append(f"validation {held}; drift sampled on {drift}; {rule}")


def check_signal_folds(config: RecipeConfig, seed_pairs: int | None) -> None:
    """The label-signal check needs two seed pairs per fold (one to fit on, one to hold out, in each fold)."""
    folds = config.judge.signal_folds
    if folds and seed_pairs is not None and seed_pairs < 2 * folds:
        raise SelfieError(
            f"recipe key 'judge.signal_folds': {folds} folds need at least {2 * folds} seed pairs, the seed has {seed_pairs}; "
            "set fewer folds, or 0 to skip the label-signal check"
        )


def check_trainer(config: RecipeConfig) -> None:
    """The scheduler exists, and TRL takes the train: and refine: settings as the seed and iteration stages pass
    them (building its config is cheap and creates nothing)."""
    try:
        SchedulerType(config.train.lr_scheduler_type)
    except ValueError:
        known = ", ".join(s.value for s in SchedulerType)
        raise SelfieError(
            f"recipe key 'train.lr_scheduler_type': unknown scheduler '{config.train.lr_scheduler_type}' (known: {known})"
        ) from None
    try:
        with trainer_scope():  # under a DeepSpeed launch the arguments set transformers' DeepSpeed config
            for t in (0, 1):
                build_dpo_config(
                    config.train,
                    config.refine,
                    RunContext.for_recipe(config).checkpoints(t),
                    lambda_=dnd_lambda(config.refine, t),
                    refine_on=t > 0,
                    report_to=config.report_to,
                    run_name=None,
                    seed=config.seed,
                )
    except ValueError as e:
        raise SelfieError(f"the trainer refuses the recipe's train: / refine: settings: {str(e).splitlines()[0]}") from None


def check_vllm() -> str:
    """generate.backend vllm: vLLM's environment exists and imports vllm (seconds, no engine started)."""
    python = vllm_backend.interpreter()
    return f"generation vLLM {vllm_backend.version(python)} ({python})"


def check_init(config: RecipeConfig) -> str:
    settings = config.init  # typed and range-checked when the recipe loaded
    available = len(load_prompts(settings.prompts))
    if available < settings.num_prompts:
        raise SelfieError(f"init.num_prompts: {settings.num_prompts} requested, but '{settings.prompts}' has {available} prompts")
    return f"init       {settings.method} edit from {settings.num_prompts} of the {available} prompts of {settings.prompts}"


def prompt_pool(config: RecipeConfig, inputs: list[str]) -> Splits:
    """The prompt pool cut into the seed slice, one slice per iteration and the held-out rest (each used slice non-empty)."""
    d = config.data
    rows = pool_prompts(d)
    splits = split_prompts(rows, d.seed_size, d.iteration_sizes, d.shuffle_seed)
    for t, rows_t in enumerate(splits.iterations[: config.num_iterations], 1):
        if not rows_t:
            raise SelfieError(f"data.prompts '{describe_sources(d.prompts)}': no prompts left for iteration {t}'s slice")
    inputs.append(
        f"prompts    {describe_sources(d.prompts)}: {len(rows)} prompts -> seed slice {len(splits.seed)}, iteration slices "
        f"{', '.join(str(len(s)) for s in splits.iterations)}, held out {len(splits.held_out)}"
    )
    return splits


def check_seed(config: RecipeConfig, splits: Splits, inputs: list[str]) -> list[list[dict]] | None:
    """Where the seed pairs come from, checked; returns the prompts they will be made of, at most (None: self-generated)."""
    d = config.data
    if d.seed_pairs == "alignez":  # the init stage's own AlignEZ data, else AlignEZ's defaults
        settings = config.init if isinstance(config.init, AlignEZConfig) else AlignEZConfig()
        inputs.append(f"seed pairs AlignEZ's self-generated pairs from {settings.num_prompts} prompts of {settings.prompts}")
        return None
    if d.seed_judge:
        if not splits.seed:
            raise SelfieError("data.seed_judge is set but the seed slice is empty; set data.seed_size")
        check_judge_spec(d.seed_judge, "data.seed_judge", inputs)
        return [row["prompt"] for row in splits.seed]
    pairs = seed_preferences(d, splits.seed)
    where = describe_sources(d.seed_pairs) if d.seed_pairs else f"the labels of the seed slice in {describe_sources(d.prompts)}"
    inputs.append(f"seed pairs {where}: {len(pairs)} pairs")
    return [row["prompt"] for row in pairs]


def check_judge_spec(spec: str, key: str, inputs: list[str]) -> None:
    try:
        check_judge(spec)
    except SelfieError as e:
        raise SelfieError(f"recipe key '{key}': {e}") from None
    inputs.append(f"judge      {key}: {spec}")


def check_eval(config: RecipeConfig, inputs: list[str]) -> int:
    cfg = config.eval  # typed and range-checked when the recipe loaded
    check_judge_spec(cfg.judge, "eval.judge", inputs)
    prompts = eval_prompts(cfg.prompts, cfg.split or config.data.split, cfg.num_prompts, config)
    inputs.append(f"eval       {len(prompts)} prompts of {cfg.prompts}, baseline {cfg.baseline}")
    return len(prompts)


# ---- the plan -------------------------------------------------------------------------------------


def optimizer_steps(pairs: int, train: TrainConfig, epochs: float, processes: int) -> int:
    """Optimizer steps over `pairs` pairs shared by `processes` processes."""
    batches = math.ceil(math.ceil(pairs / processes) / train.per_device_train_batch_size)
    return math.ceil(math.ceil(batches / accumulation_steps(train, processes)) * epochs)


def batch_geometry(train: TrainConfig, processes: int) -> str:
    """How many pairs one optimizer step takes, and from where."""
    accumulation = accumulation_steps(train, processes)
    source = "train.global_batch_size" if train.global_batch_size else "train.gradient_accumulation_steps"
    return (
        f"global batch {processes * train.per_device_train_batch_size * accumulation} pairs per optimizer step = "
        f"{processes} process{'es' if processes > 1 else ''} x {train.per_device_train_batch_size} per device "
        f"(train.per_device_train_batch_size) x {accumulation} accumulated ({source})"
    )


def _training(config: RecipeConfig, pairs: int | None, epochs: float | None) -> str:
    if pairs is None:
        return "DPO of a new LoRA adapter"
    processes = world_size()
    steps = optimizer_steps(pairs, config.train, epochs, processes)
    batch = processes * config.train.per_device_train_batch_size * accumulation_steps(config.train, processes)
    return f"{epochs:g} epoch{'' if epochs == 1 else 's'}, <= {steps} optimizer steps of {batch} pairs"


def _labeller_trainings(config: RecipeConfig, pairs: int | None, epochs: float | None) -> str:
    """What the seed stage trains besides the seed adapter: the ensemble's members and the label-signal check's fold
    labellers (selfie/run/labellers.py), each a seed training of its own."""
    j, parts = config.judge, []
    if j.labeller == "ensemble":
        parts.append(f"{j.ensemble_size} ensemble members on {pairs or 'the'} resampled pairs each")
    if j.signal_folds and j.labeller in ("implicit", "ensemble", "consistency"):
        per_fold = j.ensemble_size if j.labeller == "ensemble" else 1
        fold_pairs = pairs - pairs // j.signal_folds if pairs else None
        what = f"{fold_pairs} pairs" if fold_pairs else "(k-1)/k of the pairs"
        steps = f", <= {optimizer_steps(fold_pairs, config.train, epochs, world_size())} steps each" if fold_pairs else ""
        parts.append(f"label-signal check: {j.signal_folds * per_fold} trainings on {what}{steps}")
    return "".join(f"; + {part}" for part in parts)


def work(config: RecipeConfig, t: int, stage: str, sizes: dict) -> str:
    """One line: what (iteration t, stage) will do, as far as the checked inputs tell."""
    g, d = config.generate, config.data
    prompts = sizes.get(t)
    if stage == INIT.name:
        return f"{config.init.method} edit of {config.model.name} -> pi_init"
    if stage == SEED.name:
        n = sizes.get(SEED.name)
        epochs = seed_epochs(config.train, n) if n is not None else None
        if d.seed_judge and n is not None:
            k = d.seed_samples
            return (
                f"{n} seed prompts x {k} samples (<= {n * k * g.max_new_tokens} new tokens) labelled by {d.seed_judge} "
                f"-> <= {n} pairs; DPO of a new LoRA adapter, {_training(config, n, epochs)}"
            )
        return (
            f"DPO of a new LoRA adapter on {n if n is not None else 'the'} seed pairs, {_training(config, n, epochs)}"
            + _labeller_trainings(config, n, epochs)
        )
    if stage == VALIDATE.name:
        return _validation_work(config, t, sizes.get(VALIDATE.name))
    if prompts is None:
        return "-"
    responses = g.num_responses + config.judge.anchored  # an anchored run samples pi_init once more per prompt
    if stage == GENERATE.name:
        anchor = " (+ 1 of pi_init: the anchor)" if config.judge.anchored else ""
        return f"{prompts} prompts x {g.num_responses} responses{anchor}, <= {prompts * responses * g.max_new_tokens} new tokens"
    if stage == JUDGE.name:
        scorer = "implicit reward" if config.judge.labeller == "implicit" else config.judge.labeller
        return f"{scorer} of {prompts * responses} responses -> <= {prompts} pairs"
    if stage == TRAIN.name:
        total = prompts + round(d.replay / (1 - d.replay) * prompts)
        replay = f" (+ {total - prompts} replayed seed pairs)" if total > prompts else ""
        return f"noise-aware DPO on <= {prompts} pairs{replay}, {_training(config, total, config.train.num_train_epochs)}"
    cfg, n = config.eval, sizes.get(EVAL.name)
    models = 1 if cfg.baseline == "none" else 2
    return f"{n} prompts x {models} models (<= {n * models * cfg.max_new_tokens} new tokens), scored by {cfg.judge}"


def _validation_work(config: RecipeConfig, t: int, pairs: int | None) -> str:
    v, tokens = config.validation, config.generate.max_new_tokens
    policy = "pi_0 (the seed adapter)" if t == 0 else f"pi_{t}"
    samples = f"{v.prompts} samples" if v.prompts else "a sample per pair's prompt"
    init = " (and pi_init's, once)" if t == 0 else ""
    held = f"{pairs} held-out pairs" if pairs is not None else "the held-out pairs"
    return f"{policy} on {held} (accuracy, loss) and {samples}{init} of <= {tokens} tokens (length, KL)"


def plan_text(plan: Plan, exists: bool) -> str:
    """The dry run's report: inputs, then one row per stage with what it does and where its artifacts go."""
    config, steps = plan.config, plan.steps
    ctx = RunContext.for_recipe(config)
    done = sum(step.done for step in steps)
    state = f"exists, {done} of {len(steps)} stages done" if exists else "new"
    lines = [
        f"run        {config.output_dir} ({state})",
        *plan.inputs,
        "",
        f"{'iter':>4}  {'stage':<8}  {'status':<6}  {'work':<72}  writes (in {config.output_dir})",
    ]
    for step in steps:
        lines.append(
            f"{step.iteration:>4}  {step.stage:<8}  {'done' if step.done else 'to do':<6}  {step.work:<72}  "
            f"{', '.join(ctx.relative(path) for path in ctx.artifacts(step.iteration, step.stage))}"
        )
    keep = "kept (train.keep_checkpoints)" if config.train.keep_checkpoints else "deleted once the stage's adapter is recorded"
    lines += [
        "",
        f"trainer checkpoints go to {CHECKPOINTS}/ beside each adapter ({keep}); metrics to each iteration's "
        f"{ctx.metrics(0).name}; {ctx.summary_file.name}, {ctx.summary_plot.name} and wandb/ at the top",
        "dry run: nothing was written",
    ]
    return "\n".join(lines)
