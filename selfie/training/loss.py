"""The noise-aware DPO loss (docs/METHOD.md section 1.7) as functions of tensors, free of any trainer.

Per pair i, with z_i = (logp_theta(y_w) - logp_ref(y_w)) - (logp_theta(y_l) - logp_ref(y_l)) and the confidence
margin m_i:

    tau    = K-quantile of the per-sample margins of the last W optimizer steps   (RefinementWindow)
    eps_i  = alpha * [m_i < tau], 0 during the warm-up                             (label_smoothing)
    eps_i  = max(eps_i, 1 - C_i) where the pair's labellers agreed on it with share C_i (refine.soft_agreement)
    loss_i = -(1 - eps_i) logsigmoid(beta z_i) - eps_i logsigmoid(-beta z_i)       (noise_aware_dpo_loss)

With eps_i = 1 - C_i the loss is CREAM's consistency soft label, C l(y_w, y_l) + (1 - C) l(y_l, y_w).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
import torch.nn.functional as F


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


def warmed_up(step: int, max_steps: int, warmup_fraction: float) -> bool:
    """Whether smoothing may act at optimizer step `step`: not during the first `warmup_fraction` of the steps."""
    return step >= warmup_fraction * max_steps


def label_smoothing(margins: torch.Tensor, tau: float, alpha: float, *, warm: bool) -> torch.Tensor:
    """eps_i = alpha * [m_i < tau] once warmed up, else 0; in the margins' dtype (compared in float64, as tau is)."""
    if not warm or alpha <= 0:
        return torch.zeros_like(margins)
    return alpha * (margins.double() < tau).to(margins.dtype)


def noise_aware_dpo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    margins: torch.Tensor,
    *,
    tau: float,
    alpha: float,
    beta: float,
    warm: bool = True,
    agreement: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses and their parts, from the policy-minus-reference log-ratios of the chosen and rejected responses.

    Uses -(1-eps) logsigmoid(x) - eps logsigmoid(-x) = -logsigmoid(x) + eps x, so the parts are "sigmoid" (plain
    DPO's loss, TRL's sigmoid loss) and "smoothing" (eps beta z, what noise-awareness adds), plus "eps".
    `agreement` (C_i per pair) floors eps at 1 - C_i, from the first step (it is the label, not a refinement).
    """
    z = chosen_logratios - rejected_logratios  # as TRL's delta_score
    eps = label_smoothing(margins, tau, alpha, warm=warm)
    if agreement is not None:
        eps = torch.maximum(eps, (1 - agreement).to(eps))
    sigmoid = -F.logsigmoid(beta * z)
    smoothing = eps * beta * z
    return sigmoid + smoothing, {"sigmoid": sigmoid, "smoothing": smoothing, "eps": eps}
