"""The trainer's arguments: TRL's DPOConfig with the noise-aware loss's settings, built from a recipe's train: and
refine: sections; which trainer arguments selfie sets itself; the LoRA adapter TRL attaches."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from trl import DPOConfig

from selfie.config.schema import LoraConfig, RefineConfig, TrainConfig
from selfie.dist import on_cpu, uses_deepspeed, world_size
from selfie.errors import SelfieError

_REFINE = RefineConfig()  # the recipe's defaults, so a Python caller gets what a recipe gets
# Each refinement field and the RefineConfig key whose range it must lie in (dnd_lambda: one of refine.lambdas).
_REFINE_RANGES = {
    "refine_alpha": "alpha",
    "refine_quantile": "quantile",
    "refine_window_steps": "window_steps",
    "refine_warmup_fraction": "warmup_fraction",
    "dnd_lambda": "lambdas",
}


@dataclass
class NoiseAwareDPOConfig(DPOConfig):
    refine_alpha: float = field(default=_REFINE.alpha, metadata={"help": "Label smoothing of pairs below tau; 0 = plain DPO."})
    refine_quantile: float = field(default=_REFINE.quantile, metadata={"help": "K: tau is this quantile of recent margins."})
    refine_window_steps: int = field(
        default=_REFINE.window_steps, metadata={"help": "Margins of the last W optimizer steps form the window."}
    )
    refine_warmup_fraction: float = field(
        default=_REFINE.warmup_fraction, metadata={"help": "No smoothing during this fraction of the steps."}
    )
    dnd_lambda: float = field(default=0.0, metadata={"help": "DND extrapolation; 0 = plain implicit-reward margin."})
    refine_soft_agreement: bool = field(
        default=_REFINE.soft_agreement, metadata={"help": "Train a pair that carries an agreement C on the soft label C."}
    )

    def __post_init__(self):
        super().__post_init__()
        if (
            self.loss_type != ["sigmoid"]
            or self.loss_weights not in (None, [1.0])
            or self.ld_alpha is not None
            or self.f_divergence_type != "reverse_kl"
            or self.use_weighting
            or self.label_smoothing
        ):
            raise ValueError(
                "NoiseAwareDPOConfig builds on TRL's plain sigmoid loss; leave loss_type, loss_weights, "
                "ld_alpha, f_divergence_type, use_weighting and label_smoothing at their defaults"
            )
        if self.precompute_ref_log_probs:
            raise ValueError("precompute_ref_log_probs: the reference pass is needed for DND (and costs no copy with LoRA)")
        for name, key in _REFINE_RANGES.items():
            problem = RefineConfig.out_of_range(key, getattr(self, name))
            if problem:
                raise ValueError(f"{name}: {problem}")


def dnd_lambda(refine: RefineConfig, iteration: int) -> float:
    """lambda_t for iteration t >= 1: refine.lambdas[t-1], then halving the last one (0 for the seed stage)."""
    if iteration < 1 or not refine.lambdas:
        return 0.0
    if iteration <= len(refine.lambdas):
        return refine.lambdas[iteration - 1]
    return refine.lambdas[-1] / 2 ** (iteration - len(refine.lambdas))


def seed_epochs(train: TrainConfig, num_pairs: int) -> float:
    """SPA: 3 epochs on a seed set below 2,000 pairs, else 1, unless train.seed_epochs says otherwise."""
    if train.seed_epochs is not None:
        return train.seed_epochs
    return 3.0 if num_pairs < 2000 else 1.0


def accumulation_steps(train: TrainConfig, processes: int) -> int:
    """Gradient accumulation: train.global_batch_size / (processes x per-device batch) when the recipe sets a global
    batch, else train.gradient_accumulation_steps."""
    if train.global_batch_size is None:
        return train.gradient_accumulation_steps
    per_pass = processes * train.per_device_train_batch_size
    if train.global_batch_size % per_pass:
        raise SelfieError(
            f"recipe key 'train.global_batch_size': {train.global_batch_size} is not a multiple of {processes} "
            f"process{'es' if processes > 1 else ''} x train.per_device_train_batch_size {train.per_device_train_batch_size}"
            f" = {per_pass}; change one of them or launch another number of processes"
        )
    return train.global_batch_size // per_pass


def build_dpo_config(
    train: TrainConfig,
    refine: RefineConfig,
    output_dir: str | Path,
    *,
    lambda_: float,
    refine_on: bool,
    report_to: list[str],
    run_name: str | None,
    seed: int,
    epochs: float | None = None,
    **overrides: Any,
) -> NoiseAwareDPOConfig:
    """The recipe's train/refine sections as TRL arguments (train's other trainer fields as set); `overrides` go
    straight to NoiseAwareDPOConfig."""
    cuda = not on_cpu()
    distributed_cpu = not cuda and world_size() > 1
    values = dict(
        output_dir=str(output_dir),
        run_name=run_name,
        seed=seed,
        report_to=list(report_to) or "none",
        beta=train.beta,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler_type,
        warmup_steps=train.warmup_ratio,  # transformers 5: a float below 1 is a ratio
        num_train_epochs=train.num_train_epochs if epochs is None else epochs,
        per_device_train_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=accumulation_steps(train, world_size()),
        max_length=train.max_length,
        gradient_checkpointing=train.gradient_checkpointing,
        logging_steps=train.logging_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=2,  # the newest checkpoint may be cut by a kill; the one before it is then complete
        bf16=cuda and torch.cuda.is_bf16_supported(),  # float32 on CPU: bf16 matmul there is ~400x slower
        dataloader_pin_memory=cuda,
        ddp_backend="gloo" if distributed_cpu else None,  # DeepSpeed on CPU needs it named to see all ranks
        use_cpu=not cuda and not uses_deepspeed(),  # else CPU ranks run unsynchronised (see selfie.dist)
        refine_alpha=refine.alpha if refine_on else 0.0,
        refine_quantile=refine.quantile,
        refine_window_steps=refine.window_steps,
        refine_warmup_fraction=refine.warmup_fraction,
        refine_soft_agreement=refine.soft_agreement,
        dnd_lambda=lambda_,
    )
    values.update(train.trainer_args)  # TrainConfig.extra_keys refuses those set above
    values.update(overrides)
    return NoiseAwareDPOConfig(**values)


def peft_lora_config(lora: LoraConfig) -> PeftLoraConfig:
    # Handed to TRL unattached (unlike selfie.models.attach_lora): TRL then wraps the model itself and takes
    # "adapters disabled" as the reference, with no copy of the adapter.
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
