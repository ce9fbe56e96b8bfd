"""The trainer's arguments as recipe keys: which fields of TRL's DPOConfig (and transformers' TrainingArguments) a
recipe's `train:` section takes beside TrainConfig's own keys, and which selfie sets itself. It sits below both the
recipe loader, which checks them, and selfie/training/arguments.py, which builds the trainer's config."""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any

from selfie.config.schema import Range

_LOSS = "selfie's noise-aware loss builds on TRL's plain sigmoid DPO loss (docs/METHOD.md section 1.7)"
_DEVICE = "from the device: bf16 on a GPU that has it, float32 on CPU (see build_dpo_config)"
# Trainer arguments a recipe may not set under train:, each with why (build_dpo_config sets them, or selfie's loop
# depends on their value). Every other field of TRL's DPOConfig is a recipe key (TrainConfig.EXTRA).
SELFIE_SETS = {
    "output_dir": "each stage's checkpoints go to <output_dir>/iter_t/checkpoints; set the recipe's output_dir",
    "run_name": "set the recipe's top-level run_name",
    "seed": "set the recipe's top-level seed",
    "report_to": "set the recipe's top-level report_to",
    "max_steps": "each stage trains train.num_train_epochs epochs (train.seed_epochs for the seed stage)",
    "warmup_steps": "set train.warmup_ratio; selfie passes it as warmup_steps",
    "save_strategy": "selfie checkpoints every train.save_steps steps to resume a killed stage",
    "save_total_limit": "selfie keeps the 2 newest checkpoints: a kill may cut the newest one",
    "resume_from_checkpoint": "selfie resumes each stage from its newest complete checkpoint",
    "bf16": _DEVICE,
    "fp16": _DEVICE,
    "use_cpu": _DEVICE,
    "dataloader_pin_memory": _DEVICE,
    "ddp_backend": "from the device and the launcher (selfie/dist.py)",
    "local_rank": "the launcher sets it",
    "model_init_kwargs": "selfie loads the model itself; set model.dtype, model.attn_implementation, model.load_in_4bit, ...",
    "trust_remote_code": "set model.trust_remote_code",
    "precompute_ref_log_probs": "the reference pass runs live: DND needs its hidden states (and with LoRA it costs no copy)",
    "sync_ref_model": "the reference is pi_{t-1}, fixed for the stage (docs/METHOD.md)",
    "ref_model_mixup_alpha": "the reference is pi_{t-1}, fixed for the stage (docs/METHOD.md)",
    "ref_model_sync_steps": "the reference is pi_{t-1}, fixed for the stage (docs/METHOD.md)",
    **{
        name: _LOSS for name in ("loss_type", "loss_weights", "ld_alpha", "f_divergence_type", "use_weighting", "label_smoothing")
    },
    **{
        f"refine_{name}": f"set refine.{name}"
        for name in ("alpha", "quantile", "window_steps", "warmup_fraction", "soft_agreement")
    },
    "dnd_lambda": "set refine.lambdas",  # the refine_* and dnd_lambda: NoiseAwareDPOConfig's own fields
}


_MAPPING = Range(lambda v: isinstance(v, dict), "a mapping, e.g. {use_reentrant: false}", whole=True)
# The trainer fields whose values have an obvious range, checked as the recipe loads; the rest TRL and transformers
# check themselves when the preflight builds the arguments.
TRAINER_RANGES = {
    "max_grad_norm": Range(lambda v: v >= 0, ">= 0 (0: no clipping)"),
    "weight_decay": Range(lambda v: v >= 0, ">= 0"),
    "adam_beta1": Range(lambda v: 0 <= v < 1, "a value in [0, 1)"),
    "adam_beta2": Range(lambda v: 0 <= v < 1, "a value in [0, 1)"),
    "adam_epsilon": Range(lambda v: v > 0, "> 0"),
    "dataloader_num_workers": Range(lambda v: v >= 0, ">= 0"),
    "ddp_timeout": Range(lambda v: v > 0, "> 0 seconds"),
    "gradient_checkpointing_kwargs": _MAPPING,
    "lr_scheduler_kwargs": _MAPPING,
}


@functools.cache
def trainer_fields() -> dict[str, Any]:
    """{field: type hint} of the trainer's arguments (TRL's DPOConfig, imported when first asked: a recipe without
    trainer arguments loads without TRL) and of NoiseAwareDPOConfig's own fields, which SELFIE_SETS refuses."""
    from trl import DPOConfig

    hints = typing.get_type_hints(DPOConfig)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(DPOConfig) if f.init}
    return fields | {name: Any for name in SELFIE_SETS if name.startswith(("refine_", "dnd_"))}
