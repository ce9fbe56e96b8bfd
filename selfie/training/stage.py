"""One training stage: preference pairs in; a trained LoRA adapter and the stage's metrics out.

The caller says where the stage writes (`TrainOutputs`): the run directory's layout is selfie/run's business.

References need no model copies: the seed stage trains a fresh adapter (reference = adapters disabled =
pi_init); iteration t continues the previous adapter, and TRL keeps a frozen copy of it as the adapter
"ref" (reference = pi_{t-1}); "merge" mode folds the previous adapter into the base weights and starts a
fresh one. Only the adapter "default" is ever saved as the result.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset
from peft import LoraConfig as PeftLoraConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from selfie.config.schema import LoraConfig, ModelConfig, RecipeConfig
from selfie.dist import check_topology, trainer_scope
from selfie.errors import SelfieError
from selfie.models import (
    base_fingerprint,
    load_adapter,
    load_model,
    load_tokenizer,
    merge_adapter,
    prepare_for_training,
    unwrap_peft,
)
from selfie.tokens import response_token_ids, stop_token_ids
from selfie.training.adapter_export import gather_adapter, write_adapter
from selfie.training.arguments import build_dpo_config, dnd_lambda, peft_lora_config, seed_epochs
from selfie.training.trainer import NoiseAwareDPOTrainer, last_checkpoint

logger = logging.getLogger(__name__)

PAIR_COLUMNS = ["prompt", "chosen", "rejected"]  # what a pair needs; `*_finished` (default true) say how to render it


@dataclass(frozen=True)
class TrainOutputs:
    """Where a training stage writes, and the name the trainer reports it under (TrainingArguments.run_name)."""

    adapter: Path  # the trained adapter, written once training is done
    checkpoints: Path  # the trainer's checkpoints; the stage resumes from the newest complete one
    run_name: str | None = None


def _pairs_dataset(pairs: list[dict] | Dataset, tokenizer: PreTrainedTokenizerBase, stop_ids: set[int]) -> Dataset:
    """prompt_ids / chosen_ids / rejected_ids of each pair, tokenised exactly as the judge scores them.

    TRL would render every completion as a finished assistant turn (end-of-turn token and what the template
    writes after it); a response cut at the length limit (`chosen_finished` / `rejected_finished` false) is
    trained as it was judged and generated, without an end-of-turn token. Pairs that carry an `agreement` keep it
    (for refine.soft_agreement).
    """
    rows = list(pairs)
    if not rows:
        raise SelfieError("training pairs: the set is empty")
    tokenised, agreed = [], any("agreement" in row for row in rows)
    for n, row in enumerate(rows, 1):
        missing = [c for c in PAIR_COLUMNS if c not in row]
        if missing:
            raise SelfieError(f"training pairs: row {n}: missing column '{missing[0]}' (have {', '.join(row)})")
        texts = [row[side][-1]["content"] for side in ("chosen", "rejected")]
        finished = [row.get("chosen_finished", True), row.get("rejected_finished", True)]
        prompt_ids, (chosen_ids, rejected_ids) = response_token_ids(tokenizer, row["prompt"], texts, finished, stop_ids)
        tokenised.append({"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids})
        if agreed:  # an ensemble's or a pairwise judge's pairs (a replayed seed pair: 1)
            tokenised[-1]["agreement"] = float(row.get("agreement", 1.0))
    return Dataset.from_list(tokenised)


def _summary(
    trainer: NoiseAwareDPOTrainer, num_pairs: int, seconds: float, adapter: Path, resumed_from: str | None
) -> dict[str, Any]:
    history = trainer.state.log_history  # restored from the checkpoint on resume, so it covers the whole run
    logged = [h for h in history if "loss" in h]
    last = logged[-1] if logged else {}
    totals = trainer.refine_totals
    return {
        "pairs": num_pairs,
        "steps": trainer.state.global_step,
        "epochs": trainer.args.num_train_epochs,
        "train_loss": sum(h["loss"] for h in logged) / len(logged) if logged else None,
        "lambda": trainer.args.dnd_lambda,
        "refine_alpha": trainer.args.refine_alpha,
        "refine/smoothed_fraction": totals["smoothed"] / totals["samples"] if totals["samples"] else 0.0,
        **{k: last[k] for k in ("refine/tau", "refine/margin_mean", "rewards/accuracies", "rewards/margins") if k in last},
        "seconds": seconds,
        "adapter": str(adapter),
        "resumed_from": resumed_from,
        "distributed": trainer.accelerator.distributed_type.value,
        "processes": trainer.accelerator.num_processes,
    }


def _check_stage(mode: str, iteration: int, prev_adapter: str | Path | None) -> None:
    if mode not in ("continue", "merge"):
        raise SelfieError(f"train.adapter_mode: expected 'continue' or 'merge', got '{mode}'")
    if (iteration == 0) != (prev_adapter is None):
        raise ValueError("the seed stage (iteration 0) takes no previous adapter; later iterations need one")


def _load_base(
    model: str | PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, settings: ModelConfig, stacks: bool
) -> tuple[str | None, PreTrainedModel, PreTrainedTokenizerBase]:
    """(base name, model, tokenizer): a name or path is loaded; a model object comes with its tokenizer. Stacking
    the adapters (merge mode) reloads the base, so it needs the name."""
    if tokenizer is None:
        if not isinstance(model, str):
            raise ValueError("pass the tokenizer along with a model object")
        tokenizer = load_tokenizer(model, settings)
    if isinstance(model, str):
        return model, load_model(model, settings), tokenizer
    if stacks:
        raise ValueError("adapter_mode 'merge' needs the base model's name or path (it reloads it to stack the adapters)")
    return None, model, tokenizer


def _policy(
    model: PreTrainedModel, iteration: int, mode: str, prev_adapter: str | Path | None, lora: LoraConfig
) -> tuple[PreTrainedModel, PeftLoraConfig | None, Path | None]:
    """(model, the fresh adapter TRL attaches or None, the adapter the trained one is stacked onto or None)."""
    if iteration == 0:
        return model, peft_lora_config(lora), None
    if mode == "continue":
        return load_adapter(model, prev_adapter, trainable=True), None, None  # TRL adds the frozen copy "ref" = pi_{t-1}
    return (
        merge_adapter(load_adapter(model, prev_adapter)),
        peft_lora_config(lora),
        Path(prev_adapter),
    )  # reference = merged = pi_{t-1}


def _build_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    peft_config: PeftLoraConfig | None,
    config: RecipeConfig,
    outputs: TrainOutputs,
    iteration: int,
    callbacks: list[TrainerCallback] | None,
    overrides: dict[str, Any],
) -> NoiseAwareDPOTrainer:
    try:
        args = build_dpo_config(
            config.train,
            config.refine,
            outputs.checkpoints,
            lambda_=dnd_lambda(config.refine, iteration),
            refine_on=iteration > 0,
            report_to=config.report_to,
            run_name=outputs.run_name,
            seed=config.seed,
            epochs=seed_epochs(config.train, len(dataset)) if iteration == 0 else None,
            **overrides,
        )
        return NoiseAwareDPOTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
    except ValueError as e:  # TRL, transformers or PEFT refusing a value that got past the recipe's own checks
        raise SelfieError(
            f"iteration {iteration}: the trainer refused the recipe's train / lora settings: {str(e).splitlines()[0]}"
        ) from e


def train_adapter(
    model: str | PreTrainedModel,
    pairs: list[dict] | Dataset,
    outputs: TrainOutputs,
    config: RecipeConfig,
    *,
    iteration: int = 0,
    prev_adapter: str | Path | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    adapter_mode: str | None = None,
    callbacks: list[TrainerCallback] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train one stage's adapter into `outputs.adapter`, checkpointing into `outputs.checkpoints`.

    iteration 0 (seed): a fresh adapter on `model`, reference = `model`, plain DPO (no refinement).
    iteration t >= 1: from `prev_adapter`, reference = model + prev_adapter, refinement on, lambda_t.
    Resumes from the newest complete checkpoint when there is one. `overrides` go to the TRL config.
    Returns the stage metrics.
    """
    check_topology()
    mode = adapter_mode or config.train.adapter_mode
    _check_stage(mode, iteration, prev_adapter)
    base_name, model, tokenizer = _load_base(model, tokenizer, config.model, stacks=mode == "merge" and iteration > 0)
    dataset = _pairs_dataset(pairs, tokenizer, stop_token_ids(model, tokenizer))  # a PeftModel shows its base's config
    train = config.train
    model = prepare_for_training(model, train.gradient_checkpointing, train.trainer_args.get("gradient_checkpointing_kwargs"))
    model, peft_config, stack_on = _policy(model, iteration, mode, prev_adapter, config.lora)
    # taken before training shards the weights: the adapter applies to pi_init (merge mode stacks onto it again)
    fingerprint = base_fingerprint(unwrap_peft(model))
    with trainer_scope():
        trainer = _build_trainer(model, tokenizer, dataset, peft_config, config, outputs, iteration, callbacks, overrides)
        checkpoint = last_checkpoint(trainer.args.output_dir)
        if checkpoint:
            logger.info("resuming training from %s", checkpoint)
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=checkpoint)
        seconds = time.perf_counter() - start
        trained, state = gather_adapter(trainer)
        summary = _summary(trainer, len(dataset), seconds, outputs.adapter, checkpoint)
        accelerator = trainer.accelerator
        accelerator.free_memory()  # its engine, optimizer and wrapped model: the next stage loads its own
    if accelerator.is_main_process:  # stacking loads the base again: outside the trainer's DeepSpeed config
        write_adapter(trained, state, outputs.adapter, fingerprint, base_name, stack_on, config.model)
    accelerator.wait_for_everyone()
    return summary


def train_seed(
    model: str | PreTrainedModel,
    pairs: list[dict] | Dataset,
    outputs: TrainOutputs,
    config: RecipeConfig,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Stage 0: DPO of a fresh LoRA adapter on the seed pairs, reference pi_init. Returns the stage metrics."""
    return train_adapter(model, pairs, outputs, config, iteration=0, tokenizer=tokenizer, **overrides)


def train_iteration(
    model: str | PreTrainedModel,
    prev_adapter: str | Path,
    pairs: list[dict] | Dataset,
    outputs: TrainOutputs,
    config: RecipeConfig,
    iteration: int,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    adapter_mode: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Stage t >= 1: noise-aware DPO from pi_{t-1} = model + prev_adapter, reference pi_{t-1}. Returns the stage metrics."""
    if iteration < 1:
        raise ValueError(f"iteration must be >= 1, got {iteration}")
    return train_adapter(
        model,
        pairs,
        outputs,
        config,
        iteration=iteration,
        prev_adapter=prev_adapter,
        tokenizer=tokenizer,
        adapter_mode=adapter_mode,
        **overrides,
    )
