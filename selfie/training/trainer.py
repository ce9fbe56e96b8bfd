"""Noise-aware DPO with self-refinement (docs/METHOD.md section 1.7) as a TRL DPOTrainer subclass.

TRL's `_compute_loss` runs the policy pass (with grad) and the reference pass (without) and returns the
sigmoid loss. This subclass keeps those two passes and adds, per pair i,

    m_i   = beta * [(logp~(y_w) - logp~(y_l)) - (logp_ref(y_w) - logp_ref(y_l))]   (detached; DND, lambda > 0:
            logp~ from the extrapolated logits (1 + lambda) h_theta - lambda h_ref at the completion positions)
    tau   = K-quantile of the per-sample margins of the last W optimizer steps, gathered over all ranks
    eps_i = alpha * [m_i < tau]   (0 during the first warmup_fraction of the steps)
    loss_i = -(1 - eps_i) logsigmoid(beta z_i) - eps_i logsigmoid(-beta z_i)

The passes' outputs are local to TRL's method, so forward hooks record them: the policy's and reference's
per-token log-probs, and (only for DND) the backbone's last hidden states, from which the logits are built
at the completion positions only, tiled over the vocabulary (selfie/projection.py).

References need no model copies: the seed stage trains a fresh adapter (reference = adapters disabled =
pi_init); iteration t continues the previous adapter, and TRL keeps a frozen copy of it as the adapter
"ref" (reference = pi_{t-1}); "merge" mode folds the previous adapter into the base weights and starts a
fresh one. Only the adapter "default" is ever saved as the result.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from trl import DPOTrainer
from trl.trainer.utils import maybe_gather_lm_head_ctx

from selfie.config.schema import ModelConfig, RecipeConfig
from selfie.dist import check_topology
from selfie.errors import SelfieError
from selfie.io import atomic_write_json, read_json
from selfie.models import (
    base_fingerprint,
    load_adapter,
    load_model,
    load_tokenizer,
    merge_adapter,
    prepare_for_training,
    save_adapter,
    unwrap_peft,
)
from selfie.projection import logit_softcap, output_layer, token_logps
from selfie.run.rundir import ADAPTER, CHECKPOINTS
from selfie.tokens import response_token_ids, stop_token_ids
from selfie.training.arguments import NoiseAwareDPOConfig, build_dpo_config, dnd_lambda, peft_lora_config, seed_epochs

logger = logging.getLogger(__name__)

REFINE_STATE = "refine_state.json"  # written last into a checkpoint: its presence marks the checkpoint complete
PAIR_COLUMNS = ["prompt", "chosen", "rejected"]  # what a pair needs; `*_finished` (default true) say how to render it


class RefinementWindow:
    """Per-sample margins of the last `steps` optimizer steps; the step in progress counts as one of them.

    Every rank adds the same gathered margins in the same order, so every rank holds the same window.
    Margins are plain floats so the window round-trips exactly through JSON.
    """

    def __init__(self, steps: int):
        self.steps = steps
        self.completed: deque[list[float]] = deque(maxlen=steps - 1)
        self.step: int | None = None  # global_step while the current optimizer step accumulates
        self.current: list[float] = []

    def add(self, step: int, margins: list[float]) -> None:
        if step != self.step:
            if self.step is not None:
                self.completed.append(self.current)
            self.step, self.current = step, []
        self.current.extend(margins)

    def quantile(self, q: float) -> float:
        values = [m for margins in self.completed for m in margins] + self.current
        return torch.quantile(torch.tensor(values, dtype=torch.float64), q).item()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "completed": list(self.completed), "step": self.step, "current": self.current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__init__(state["steps"])
        self.completed.extend(state["completed"])
        self.step, self.current = state["step"], list(state["current"])


def extrapolated_logps(
    policy_hidden: torch.Tensor,
    ref_hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    lam: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Sum over each sequence's completion tokens of log_softmax((1 + lam) h_theta - lam h_ref)[next token].

    `*_hidden` are the backbone's last hidden states [N, T, H]; logits are built only where the next token
    is a completion token (selfie/projection.py), never as a [N, T, V] tensor.
    """
    mask = completion_mask[:, 1:].bool()
    targets = input_ids[:, 1:][mask]
    rows = torch.arange(mask.size(0), device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    policy_hidden, ref_hidden = policy_hidden[:, :-1][mask], ref_hidden[:, :-1][mask]
    weight, bias = full_tensor(lm_head.weight), full_tensor(lm_head.bias)
    with torch.no_grad(), maybe_gather_lm_head_ctx(weight, bias):
        token = token_logps([(1 + lam, policy_hidden), (-lam, ref_hidden)], targets, weight, bias, softcap)
    return torch.zeros(mask.size(0), device=mask.device).index_add_(0, rows, token)


def full_tensor(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor of an FSDP2 shard (a collective: every rank must call it); other tensors as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose output TRL's fused LM head projects (`base_model` of the causal LM)."""
    return unwrap_peft(model).base_model


class NoiseAwareDPOTrainer(DPOTrainer):
    """DPOTrainer whose loss smooths the labels of low-confidence pairs (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, NoiseAwareDPOConfig):
            raise TypeError("NoiseAwareDPOTrainer needs a NoiseAwareDPOConfig")
        self.window = RefinementWindow(self.args.refine_window_steps)
        self.refine_totals = {"samples": 0, "smoothed": 0}  # after warm-up, for the run's summary
        self._capturing = False
        self._logps: list[torch.Tensor] = []
        self._hidden: list[torch.Tensor] = []
        for model in filter(None, (self.model, self.ref_model)):
            model = self.accelerator.unwrap_model(model)
            model.register_forward_hook(self._record_logps)
            if self.args.dnd_lambda:
                _backbone(model).register_forward_hook(self._record_hidden)

    # ---- recording TRL's two passes -------------------------------------------------------------

    def _record_logps(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._capturing and getattr(output, "log_probs", None) is not None:
            self._logps.append(output.log_probs)

    def _record_hidden(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._capturing:
            self._hidden.append(output.last_hidden_state.detach())

    def _compute_loss(self, model, inputs, return_outputs):
        self._logps, self._hidden, self._capturing = [], [], True
        try:
            result = super()._compute_loss(model, inputs, return_outputs)
        finally:
            self._capturing = False
        loss, outputs = result if return_outputs else (result, None)
        (policy, reference), hidden = self._logps[:2], self._hidden[:2]
        self._logps, self._hidden = [], []

        seq_len = inputs["completion_mask"].size(1) - 1
        chosen_logps, rejected_logps = policy[:, -seq_len:].sum(dim=1).chunk(2)
        ref_chosen_logps, ref_rejected_logps = reference[:, -seq_len:].sum(dim=1).chunk(2)
        z = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)  # as TRL's delta_score
        margins = self._margins(z, hidden, inputs, ref_chosen_logps - ref_rejected_logps)
        eps = self._smoothing(margins)
        if eps.any():
            # -(1-eps) logsigmoid(x) - eps logsigmoid(-x) = -logsigmoid(x) + eps x: TRL's sigmoid loss plus eps x
            loss = loss + (eps * self.beta * z).mean()
        return (loss, outputs) if return_outputs else loss

    # ---- refinement -----------------------------------------------------------------------------

    def _margins(self, z: torch.Tensor, hidden: list[torch.Tensor], inputs: dict, ref_logratio: torch.Tensor) -> torch.Tensor:
        """Confidence margin per pair, detached: the DPO implicit reward margin, DND-extrapolated when lambda > 0."""
        lam = self.args.dnd_lambda
        if not lam:
            return self.beta * z.detach()
        unwrapped = self.accelerator.unwrap_model(self.model)
        logps = extrapolated_logps(
            hidden[0],
            hidden[1],
            output_layer(unwrapped),
            inputs["input_ids"],
            inputs["completion_mask"],
            lam,
            logit_softcap(unwrapped),
        )
        chosen, rejected = logps.chunk(2)
        return self.beta * ((chosen - rejected) - ref_logratio.detach().float())

    def _smoothing(self, margins: torch.Tensor) -> torch.Tensor:
        """eps per local pair; logs refine/* metrics. Training updates the window, evaluation only reads it."""
        mode = "train" if self.model.training else "eval"
        # Every rank gathers the same margins (rank order), so every rank computes the same tau.
        gathered = self.accelerator.gather(margins.detach().float())
        self._metrics[mode]["refine/margin_mean"].append(gathered.mean().item())
        eps = torch.zeros_like(margins)
        if mode == "eval":
            return eps
        # tau for this micro-batch: the samples of the previous W-1 optimizer steps plus those of the current
        # step gathered so far, this micro-batch included (identical on every rank, whatever the process count).
        self.window.add(self.state.global_step, gathered.tolist())
        tau = self.window.quantile(self.args.refine_quantile)
        warm = self.state.global_step >= self.args.refine_warmup_fraction * self.state.max_steps
        if warm and self.args.refine_alpha > 0:
            below = margins.double() < tau
            eps = self.args.refine_alpha * below.to(margins.dtype)
            smoothed = int((gathered.double() < tau).sum().item())
        else:
            smoothed = 0
        if warm:
            self.refine_totals["samples"] += gathered.numel()
            self.refine_totals["smoothed"] += smoothed
        self._metrics[mode]["refine/tau"].append(tau)
        self._metrics[mode]["refine/smoothed_fraction"].append(smoothed / gathered.numel())
        return eps

    # ---- data -----------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Pairs selfie tokenised itself (see `_pairs_dataset`) skip TRL's chat rendering; others go through it."""
        if "prompt_ids" not in dataset.column_names:
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if args.max_length is not None and args.truncation_mode == "keep_start":  # as TRL: a prompt filling max_length
            dataset = dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length)  # leaves nothing to learn
        return dataset

    # ---- checkpoints ----------------------------------------------------------------------------

    def refine_state(self) -> dict[str, Any]:
        return {"window": self.window.state_dict(), "totals": dict(self.refine_totals)}

    def load_refine_state(self, state: dict[str, Any]) -> None:
        self.window.load_state_dict(state["window"])
        self.refine_totals = dict(state["totals"])

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            checkpoint = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            atomic_write_json(checkpoint / REFINE_STATE, self.refine_state())

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """As Trainer.train; `True` resumes from the newest complete checkpoint (or starts afresh if none)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_checkpoint(self.args.output_dir)
        if resume_from_checkpoint:
            state_file = Path(resume_from_checkpoint) / REFINE_STATE
            if not state_file.is_file():
                raise SelfieError(
                    f"{state_file}: missing; this checkpoint was not written by NoiseAwareDPOTrainer or is incomplete"
                )
            self.load_refine_state(read_json(state_file))
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)


def last_checkpoint(directory: str | Path) -> str | None:
    """The newest completely written checkpoint-N in `directory` (a kill can leave the newest one partial)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    steps = [
        int(m.group(1))
        for p in directory.iterdir()
        if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / REFINE_STATE).is_file()
    ]
    return str(directory / f"checkpoint-{max(steps)}") if steps else None


# ---- stages -------------------------------------------------------------------------------------


def _pairs_dataset(pairs: list[dict] | Dataset, tokenizer: PreTrainedTokenizerBase, stop_ids: set[int]) -> Dataset:
    """prompt_ids / chosen_ids / rejected_ids of each pair, tokenised exactly as the judge scores them.

    TRL would render every completion as a finished assistant turn (end-of-turn token and what the template
    writes after it); a response cut at the length limit (`chosen_finished` / `rejected_finished` false) is
    trained as it was judged and generated, without an end-of-turn token.
    """
    rows = list(pairs)
    if not rows:
        raise SelfieError("training pairs: the set is empty")
    tokenised = []
    for n, row in enumerate(rows, 1):
        missing = [c for c in PAIR_COLUMNS if c not in row]
        if missing:
            raise SelfieError(f"training pairs: row {n}: missing column '{missing[0]}' (have {', '.join(row)})")
        texts = [row[side][-1]["content"] for side in ("chosen", "rejected")]
        finished = [row.get("chosen_finished", True), row.get("rejected_finished", True)]
        prompt_ids, (chosen_ids, rejected_ids) = response_token_ids(tokenizer, row["prompt"], texts, finished, stop_ids)
        tokenised.append({"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids})
    return Dataset.from_list(tokenised)


@contextlib.contextmanager
def _gathered(params: list[torch.nn.Parameter]):
    """Full parameters on every rank under ZeRO-3 (no-op otherwise); every rank must enter."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _export_adapter(
    trainer: NoiseAwareDPOTrainer,
    directory: Path,
    fingerprint: str,
    base_name: str | None,
    stack_on: Path | None,
    settings: ModelConfig,
) -> None:
    """Write the trained adapter "default" to `directory` (main process), atomically.

    Its weights are gathered whole on every rank first (ZeRO-3 and FSDP shard them). With `stack_on` (merge
    mode) the trained adapter sits on pi_init + that adapter merged; the written one is both concatenated
    (PEFT's "cat": rank r_prev + r, exact), so it applies to pi_init like every other adapter.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = {n: p for n, p in model.named_parameters() if ".default." in n}
    with _gathered(list(params.values())):
        state = {n: full_tensor(p).detach().cpu() for n, p in params.items()}
    if trainer.accelerator.is_main_process:
        if stack_on is None:
            save_adapter(model, directory, state_dict=state, fingerprint=fingerprint)
        else:
            trained = get_peft_model_state_dict(model, state_dict=state, adapter_name="default")
            stacked = PeftModel.from_pretrained(load_model(base_name, settings), str(stack_on), adapter_name="previous")
            stacked.add_adapter("trained", model.peft_config["default"])
            set_peft_model_state_dict(stacked, trained, adapter_name="trained")
            stacked.add_weighted_adapter(["previous", "trained"], [1.0, 1.0], "default", combination_type="cat")
            stacked.set_adapter("default")
            save_adapter(stacked, directory)
    trainer.accelerator.wait_for_everyone()


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


def train_adapter(
    model: str | PreTrainedModel,
    pairs: list[dict] | Dataset,
    output_dir: str | Path,
    config: RecipeConfig,
    *,
    iteration: int = 0,
    prev_adapter: str | Path | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    adapter_mode: str | None = None,
    callbacks: list[TrainerCallback] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train one stage's adapter into `<output_dir>/adapter`; checkpoints go to `<output_dir>/checkpoints`.

    iteration 0 (seed): a fresh adapter on `model`, reference = `model`, plain DPO (no refinement).
    iteration t >= 1: from `prev_adapter`, reference = model + prev_adapter, refinement on, lambda_t.
    Resumes from the newest complete checkpoint when there is one. `overrides` go to the TRL config.
    Returns the stage metrics.
    """
    check_topology()
    output_dir = Path(output_dir)
    mode = adapter_mode or config.train.adapter_mode
    if mode not in ("continue", "merge"):
        raise SelfieError(f"train.adapter_mode: expected 'continue' or 'merge', got '{mode}'")
    if (iteration == 0) != (prev_adapter is None):
        raise ValueError("the seed stage (iteration 0) takes no previous adapter; later iterations need one")
    if tokenizer is None:
        if not isinstance(model, str):
            raise ValueError("pass the tokenizer along with a model object")
        tokenizer = load_tokenizer(model, config.model)
    if isinstance(model, str):
        base_name, model = model, load_model(model, config.model)
    elif mode == "merge" and iteration > 0:
        raise ValueError("adapter_mode 'merge' needs the base model's name or path (it reloads it to stack the adapters)")
    else:
        base_name = None
    dataset = _pairs_dataset(pairs, tokenizer, stop_token_ids(model, tokenizer))  # a PeftModel shows its base's config
    train = config.train
    model = prepare_for_training(model, train.gradient_checkpointing, train.trainer_args.get("gradient_checkpointing_kwargs"))

    peft_config, stack_on = None, None
    if iteration == 0:
        peft_config = peft_lora_config(config.lora)
    elif mode == "continue":
        model = load_adapter(model, prev_adapter, trainable=True)  # TRL adds the frozen copy "ref" = pi_{t-1}
    else:
        model = merge_adapter(load_adapter(model, prev_adapter))  # reference = merged model = pi_{t-1}
        peft_config, stack_on = peft_lora_config(config.lora), Path(prev_adapter)

    # taken before training shards the weights: the adapter applies to pi_init (merge mode stacks onto it again)
    fingerprint = base_fingerprint(unwrap_peft(model))
    try:
        args = build_dpo_config(
            config.train,
            config.refine,
            output_dir / CHECKPOINTS,
            lambda_=dnd_lambda(config.refine, iteration),
            refine_on=iteration > 0,
            report_to=config.report_to,
            run_name=f"{config.run_name or output_dir.parent.name}-{output_dir.name}",
            seed=config.seed,
            epochs=seed_epochs(config.train, len(dataset)) if iteration == 0 else None,
            **overrides,
        )
        trainer = NoiseAwareDPOTrainer(
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
    checkpoint = last_checkpoint(args.output_dir)
    if checkpoint:
        logger.info("resuming training from %s", checkpoint)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start
    adapter = output_dir / ADAPTER
    _export_adapter(trainer, adapter, fingerprint, base_name, stack_on, config.model)
    return _summary(trainer, len(dataset), seconds, adapter, checkpoint)


def train_seed(
    model: str | PreTrainedModel,
    pairs: list[dict] | Dataset,
    output_dir: str | Path,
    config: RecipeConfig,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Stage 0: DPO of a fresh LoRA adapter on the seed pairs, reference pi_init. Returns the stage metrics."""
    return train_adapter(model, pairs, output_dir, config, iteration=0, tokenizer=tokenizer, **overrides)


def train_iteration(
    model: str | PreTrainedModel,
    prev_adapter: str | Path,
    pairs: list[dict] | Dataset,
    output_dir: str | Path,
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
        output_dir,
        config,
        iteration=iteration,
        prev_adapter=prev_adapter,
        tokenizer=tokenizer,
        adapter_mode=adapter_mode,
        **overrides,
    )
