"""Log-probabilities of target tokens from hidden states: the vocabulary projection (docs/METHOD.md section 1.4).

One function serves the implicit-reward judge (a model's own log-probs) and the trainer's DND margins
(log-probs of logits extrapolated from two passes). Only the positions asked for are projected, tiled
over the vocabulary with a running logsumexp: the output-embedding matrix is read once per block of
positions, and no [positions, vocab] tensor or log_softmax is ever materialised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from selfie.errors import SelfieError
from selfie.models import unwrap_peft

PROJECTION_ELEMENTS = 2**19  # logits per tile (2 MiB in float32)
GPU_PROJECTION_ELEMENTS = 2**24  # on a GPU (64 MiB): small tiles there cost a kernel launch each, not cache misses
POSITION_BLOCK = 1024  # positions per pass over the vocabulary: keeps tiles >= 512 vocabulary columns wide


def logit_softcap(model: nn.Module) -> float | None:
    """c for models whose logits are c * tanh(logits / c) (Gemma 2), else None; multimodal configs nest it."""
    return getattr(unwrap_peft(model).config.get_text_config(), "final_logit_softcapping", None) or None


def output_layer(model: nn.Module) -> nn.Linear:
    """The layer that projects hidden states onto the vocabulary; its weight (and bias) is the whole projection."""
    head = unwrap_peft(model).get_output_embeddings()
    if not isinstance(head, nn.Linear):  # e.g. a LoRA-wrapped lm_head: its weight alone is not the projection
        raise SelfieError(f"the output embedding must be a plain Linear layer (got {type(head).__name__})")
    return head


def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def _mixed(terms: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """sum_k c_k * x_k, with no extra pass for a single term of weight 1."""
    (c, x), *rest = terms
    total = x if c == 1 else c * x
    for c, x in rest:
        total = total + c * x
    return total


def token_logps(
    terms: Sequence[tuple[float, torch.Tensor]],
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """log softmax(sum_k c_k * cap(W h_k + b))[target] at each position, float32, for terms (c_k, h_k [N, H]).

    One term (1.0, h) is the model's own log-prob; DND's extrapolated log-prob is the two terms
    (1 + lambda, h_policy), (-lambda, h_reference). Projecting a block of positions against a slice of
    the vocabulary at a time (flash attention's online softmax) is on 2 CPU cores ~2.5x faster than
    row chunks, at a quarter of the memory. Without a soft-cap the logits are linear in h, so several terms
    are one projection of the mixed states sum_k c_k h_k (bias scaled by sum_k c_k): DND then costs one
    pass over the vocabulary instead of two.
    """
    if len(terms) > 1 and not softcap:
        scale = sum(c for c, _ in terms)
        terms = [(1.0, _mixed([(c, h.float()) for c, h in terms]).to(terms[0][1].dtype))]
        bias = bias if bias is None or scale == 1 else scale * bias
    n = len(terms[0][1])
    out = []
    for i in range(0, n, POSITION_BLOCK):
        blocks = [(c, h[i : i + POSITION_BLOCK]) for c, h in terms]
        size = len(blocks[0][1])
        device = blocks[0][1].device
        width = max(1, (PROJECTION_ELEMENTS if device.type == "cpu" else GPU_PROJECTION_ELEMENTS) // size)
        running_max = torch.full((size, 1), float("-inf"), device=device)
        running_sum = torch.zeros((size, 1), device=device)
        for j in range(0, weight.shape[0], width):
            tile, tile_bias = weight[j : j + width], None if bias is None else bias[j : j + width]
            logits = _mixed([(c, _capped(nn.functional.linear(h, tile, tile_bias).float(), softcap)) for c, h in blocks])
            new_max = torch.maximum(running_max, logits.amax(-1, keepdim=True))
            running_sum = running_sum * (running_max - new_max).exp() + logits.sub_(new_max).exp_().sum(-1, keepdim=True)
            running_max = new_max
        target = targets[i : i + POSITION_BLOCK]
        rows, row_bias = weight[target].float(), 0.0 if bias is None else bias[target].float()
        picked = _mixed([(c, _capped((h.float() * rows).sum(-1) + row_bias, softcap)) for c, h in blocks])
        out.append(picked - (running_max + running_sum.log()).squeeze(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float32, device=terms[0][1].device)
