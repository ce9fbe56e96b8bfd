"""Noise-aware DPO with self-refinement (docs/METHOD.md section 1.7) as a TRL DPOTrainer subclass.

TRL's `_compute_loss` runs the policy pass (with grad) and the reference pass (without) and returns the
sigmoid loss. This subclass keeps those two passes and adds, per pair i,

    m_i   = beta * [(logp~(y_w) - logp~(y_l)) - (logp_ref(y_w) - logp_ref(y_l))]   (detached; DND, lambda > 0:
            logp~ from the extrapolated logits (1 + lambda) h_theta - lambda h_ref at the completion positions)
    tau   = K-quantile of the per-sample margins of the last W optimizer steps, gathered over all ranks
    eps_i = alpha * [m_i < tau]   (0 during the first warmup_fraction of the steps)
    loss_i = -(1 - eps_i) logsigmoid(beta z_i) - eps_i logsigmoid(-beta z_i)

The formula itself, as functions of tensors, is selfie/training/loss.py; this class supplies its inputs.
The passes' outputs are local to TRL's method, so forward hooks record them: the policy's and reference's
per-token log-probs, and (only for DND) the backbone's last hidden states, from which the logits are built
at the completion positions only, tiled over the vocabulary (selfie/projection.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from trl import DPOTrainer
from trl.trainer.utils import maybe_gather_lm_head_ctx

from selfie.errors import SelfieError
from selfie.io import atomic_write_json, read_json
from selfie.models import unwrap_peft
from selfie.projection import logit_softcap, output_layer, token_logps
from selfie.training.arguments import NoiseAwareDPOConfig
from selfie.training.loss import RefinementWindow, label_smoothing, noise_aware_dpo_loss, warmed_up

AGREEMENT = "agreement"  # a pair's labeller agreement, in the training rows when the pairs carry one
REFINE_STATE = "refine_state.json"  # written last into a checkpoint: its presence marks the checkpoint complete

# What NoiseAwareDPOTrainer relies on in TRL beyond its public API, gathered here: each method with the parameters it
# is called or overridden with, each attribute with what it holds. tests/test_trainer.py checks them against the
# installed TRL and names the one that changed.
TRL_INTERNALS = {
    "DPOTrainer._compute_loss": ("model", "inputs", "return_outputs"),  # overridden: the policy and reference passes
    "DPOTrainer._prepare_dataset": ("dataset", "processing_class", "args", "dataset_name"),  # overridden: selfie's ids
    "DPOTrainer._save_checkpoint": ("model", "trial"),  # overridden: refine_state.json written last
    "DPOTrainer._get_output_dir": ("trial",),  # where _save_checkpoint wrote
    "DPOTrainer._set_signature_columns_if_needed": (),  # extended: the `agreement` column is kept for the loss
    "DPOTrainer._metrics": "{'train' | 'eval': {name: [values]}}, logged and cleared by TRL",
    "CausalLMOutput.log_probs": "the per-token log-probs TRL's fused LM head returns from each forward pass",
    "trl.trainer.utils.maybe_gather_lm_head_ctx": ("params",),  # the LM head gathered under ZeRO-3 for DND
}


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
        self.data_collator = _WithAgreement(self.data_collator)
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
        agreement = inputs.pop(AGREEMENT, None)  # the loss's, not the model's (TRL passes other keys to the model)
        agreement = agreement if self.args.refine_soft_agreement else None
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
        chosen_logratios, rejected_logratios = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
        z = chosen_logratios - rejected_logratios  # as TRL's delta_score
        margins = self._margins(z, hidden, inputs, ref_chosen_logps - ref_rejected_logps)
        threshold = self._threshold(margins)
        if threshold is not None:
            tau, warm = threshold
            alpha = self.args.refine_alpha
            _, parts = noise_aware_dpo_loss(
                chosen_logratios,
                rejected_logratios,
                margins,
                tau=tau,
                alpha=alpha,
                beta=self.beta,
                warm=warm,
                agreement=agreement,
            )
            # TRL's loss already is the mean sigmoid part (plus any MoE aux loss): adding only the smoothing part keeps
            # it exactly TRL's loss when nothing is smoothed
            if parts["eps"].any():
                loss = loss + parts["smoothing"].mean()
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

    def _threshold(self, margins: torch.Tensor) -> tuple[float, bool] | None:
        """(tau, warmed up) in training, None in evaluation; logs refine/* metrics. Only training updates the window."""
        mode = "train" if self.model.training else "eval"
        # Every rank gathers the same margins (rank order), so every rank computes the same tau.
        gathered = self.accelerator.gather(margins.detach().float())
        self._metrics[mode]["refine/margin_mean"].append(gathered.mean().item())
        if mode == "eval":
            return None
        # tau for this micro-batch: the samples of the previous W-1 optimizer steps plus those of the current
        # step gathered so far, this micro-batch included (identical on every rank, whatever the process count).
        self.window.add(self.state.global_step, gathered.tolist())
        tau = self.window.quantile(self.args.refine_quantile)
        warm = warmed_up(self.state.global_step, self.state.max_steps, self.args.refine_warmup_fraction)
        smoothed = int(label_smoothing(gathered, tau, self.args.refine_alpha, warm=warm).count_nonzero().item())
        if warm:
            self.refine_totals["samples"] += gathered.numel()
            self.refine_totals["smoothed"] += smoothed
        self._metrics[mode]["refine/tau"].append(tau)
        self._metrics[mode]["refine/smoothed_fraction"].append(smoothed / gathered.numel())
        return tau, warm

    # ---- data -----------------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if AGREEMENT not in self._signature_columns:  # else the Trainer drops it as no input of the model's
            self._signature_columns = [*self._signature_columns, AGREEMENT]

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Pairs selfie tokenised itself (stage.py::_pairs_dataset) skip TRL's chat rendering; others go through it."""
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


class _WithAgreement:
    """TRL's collator, plus the pairs' `agreement` as a tensor when the rows carry one."""

    def __init__(self, collate: Any):
        self.collate = collate

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        if AGREEMENT in examples[0]:
            batch[AGREEMENT] = torch.tensor([example[AGREEMENT] for example in examples], dtype=torch.float32)
        return batch
