"""`selfie export RUN`: one iteration's policy as a standalone model or a PEFT adapter, with a model card.

The policy of iteration t is pi_init (the configured model, or RUN/init/model when the run had an
`init:` edit) plus RUN/iter_t/adapter; every adapter of a run applies to pi_init (see trainer.py).
`merge` folds the adapter into pi_init's weights: the result loads with plain `AutoModelForCausalLM`.
`adapter` writes the PEFT adapter with `base_model_name_or_path` set to a base that exists: the hub id
when pi_init is a plain hub model, else pi_init itself exported to DIR/base (named by absolute path).
The export is built in a temporary directory beside DIR and renamed into place.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from selfie.config.schema import ModelConfig, RecipeConfig
from selfie.errors import SelfieError
from selfie.export.model_card import build_card
from selfie.hub import push, require_hub_login
from selfie.io import atomic_directory, read_json
from selfie.models import BUILTIN_MODELS, is_local, load_adapter, load_model, merge_adapter, resolve_model_path
from selfie.run.plan import adapter_stage
from selfie.run.rundir import RunContext
from selfie.run.validation import recorded_best

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_iteration(ctx: RunContext, iteration: int | None) -> int:
    """`iteration` if it is complete, else an error; None means the one that validated best (a recipe with
    `validation:`), else the last completed one."""
    done = ctx.iterations_in_manifest()
    if iteration is None:
        if not done:
            raise SelfieError(f"{ctx.run_dir}: no completed iteration to export (the seed stage is not in manifest.json yet)")
        best = recorded_best(ctx)
        if best is not None:
            logger.info("iteration %d: the best on validation (--iteration picks another)", best)
            return best
        return done[-1]
    if iteration not in done:
        raise SelfieError(
            f"{ctx.run_dir}: iteration {iteration} is not complete (no '{adapter_stage(iteration).name}' stage done in manifest.json); "
            f"completed: {', '.join(map(str, done)) or 'none'}"
        )
    return iteration


def hub_base(config: RecipeConfig) -> str | None:
    """The hub id that pi_init is, or None when it is an edit, a local directory, a .gguf file or a built-in alias."""
    name = config.model.name
    if config.init or name in BUILTIN_MODELS or is_local(name):
        return None
    return name


def check_output(output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise SelfieError(f"{output}: exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise SelfieError(f"{output}: directory is not empty; choose another --output or pass --force to replace it")


def _own_dtype(path: str) -> torch.dtype:
    """The dtype a model directory or hub id records in its config (float32 when it records none)."""
    dtype = AutoConfig.from_pretrained(path).dtype
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32


def save_model(model: PreTrainedModel, source: str, directory: Path, dtype: torch.dtype) -> None:
    """Weights (safetensors, in `dtype`), generation config and `source`'s own tokenizer, into `directory`."""
    model.to(dtype).save_pretrained(directory, safe_serialization=True)  # writes generation_config.json too
    AutoTokenizer.from_pretrained(source).save_pretrained(directory)


def full_precision(settings: ModelConfig) -> ModelConfig:
    """The model: section loading pi_init's own weights in float32: a run trained on a 4-bit / 8-bit base (QLoRA)
    exports its adapter merged into, or pointed at, the unquantised base."""
    if settings.quantized:
        logger.warning("the run trained on a quantised base: exporting against its unquantised float32 weights")
    return settings.unquantised("float32")


def write_merged(base: str, adapter: Path, directory: Path, dtype: torch.dtype | None, settings: ModelConfig) -> None:
    """pi_init + adapter merged (in float32, then cast to `dtype`, default pi_init's own) as a standalone model."""
    path = resolve_model_path(base)
    merged = merge_adapter(load_adapter(load_model(base, full_precision(settings)), adapter))
    save_model(merged, path, directory, dtype or _own_dtype(path))


def write_adapter(config: RecipeConfig, base: str, adapter: Path, directory: Path, final: Path, dtype: torch.dtype | None) -> str:
    """The PEFT adapter, pointed at the hub id or at pi_init exported to `final`/base; returns that reference."""
    reference = hub_base(config)
    if reference is None:
        path = resolve_model_path(base)
        save_model(load_model(base, full_precision(config.model)), path, directory / "base", dtype or _own_dtype(path))
        reference = str(final.resolve() / "base")
    shutil.copyfile(adapter / "adapter_model.safetensors", directory / "adapter_model.safetensors")
    adapter_config = read_json(adapter / "adapter_config.json")
    adapter_config["base_model_name_or_path"] = reference
    (directory / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")  # the whole directory is staged
    return reference


def export_run(
    run_dir: str | Path,
    output: str | Path,
    *,
    iteration: int | None = None,
    adapter_only: bool = False,
    dtype: str | None = None,
    force: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
) -> Path:
    """Export iteration `iteration` (default: the last completed) of a run into `output`; optionally push it."""
    output = Path(output)
    if push_to_hub:
        require_hub_login()
    ctx = RunContext.load(run_dir)
    config, base = ctx.config, ctx.pi_init  # pi_init: the configured model, or the edited one
    t = pick_iteration(ctx, iteration)
    adapter = ctx.adapter(t)
    if not (adapter / "adapter_config.json").is_file():
        raise SelfieError(f"{adapter}: recorded done in manifest.json but holds no adapter_config.json")
    check_output(output, force)
    target = DTYPES[dtype] if dtype else None
    with atomic_directory(output) as tmp:
        if adapter_only:
            reference = write_adapter(config, base, adapter, tmp, output, target)
        else:
            write_merged(base, adapter, tmp, target, config.model)
            reference = None
        card = build_card(ctx, t, adapter_reference=reference, output=output, repo_id=push_to_hub)
        card.save(tmp / "README.md")
    logger.info("exported iteration %d of %s to %s", t, ctx.run_dir, output)
    if push_to_hub:
        logger.info("pushed to %s", push(output, push_to_hub, private, f"selfie export of {ctx.run_dir.name}, iteration {t}"))
    return output
