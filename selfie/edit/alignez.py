"""AlignEZ: from self-generated pairs to per-layer edits (docs/METHOD.md sections 2.2-2.5).

Which directions are u+ and u-? Taking both from the (y+, y-) pairs makes them parallel (u- = -u+)
and the edit degenerates: (I + a u u^T)(I - u u^T) = I - u u^T, the boost is wiped out. So each is
measured against a neutral reference, the model's own plain answer y0 to the same query:
    u- = finder(h(q + y-), h(q + y0))   what the harmful persona adds to the default answer
    u+ = finder(h(q + y+), h(q + y0))   what the helpful persona adds, then made orthogonal to u-
(the plain answer's last token is the same kind of position as y+'s and y-'s; the bare query's
would add a response-vs-no-response component to both). Orthogonality makes the edit exactly
"remove the u- component, scale the u+ component by 1 + alpha". Layers are scored on the pairs
themselves: held-out accuracy of the (y+, y-) direction at ranking h+ above h-.
"""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfie.config import AlignEZConfig
from selfie.edit.alignez_data import AlignEZData
from selfie.edit.apply import Edit
from selfie.edit.directions import choose_layers, get_finder, score_layers
from selfie.edit.hidden import collect_states, encode
from selfie.errors import SelfieError
from selfie.tokens import pad_token_id

logger = logging.getLogger(__name__)


def orthogonalize(rows: torch.Tensor, against: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Gram-Schmidt: `rows` made orthogonal to `against` and to each other, unit length, signs kept.

    A row that lies (numerically) inside the span already covered is dropped.
    """
    basis = list(against.double())
    kept = []
    for row in rows.double():
        for b in basis:
            row = row - (row @ b) * b
        norm = row.norm()
        if norm > tol:
            basis.append(row / norm)
            kept.append(row / norm)
    if len(kept) < len(rows):
        logger.warning("%d of %d helpful direction(s) lie in the harmful subspace and were dropped", len(rows) - len(kept), len(rows))
    return torch.stack(kept).float() if kept else rows.new_zeros((0, rows.shape[1]))


def pair_states(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: AlignEZData, config: AlignEZConfig
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Last-token states [N, L, H] of q + y+, q + y-, and q + y0 (the plain answer to the pair's query)."""
    items = [encode(tokenizer, p["prompt"], p["chosen"][0]["content"]) for p in data.pairs]
    items += [encode(tokenizer, p["prompt"], p["rejected"][0]["content"]) for p in data.pairs]
    items += [encode(tokenizer, row["prompt"], row["responses"][0]) for row in data.plain]
    states = collect_states(model, items, pad_token_id(tokenizer), location=config.location, mode="last",
                            batch_size=config.batch_size, desc="alignez states")
    n = len(data.pairs)
    plain_row = {row["prompt_id"]: i for i, row in enumerate(data.plain)}
    plain = states[2 * n:][torch.tensor([plain_row[p["prompt_id"]] for p in data.pairs])]
    return states[:n], states[n:2 * n], plain


def alignez_edits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: AlignEZData, config: AlignEZConfig,
                  seed: int = 0) -> tuple[list[Edit], dict]:
    """The edits at the chosen layers, and what was measured on the way (scores, layers, overlaps)."""
    pos, neg, plain = pair_states(model, tokenizer, data, config)
    finder = get_finder(config.finder, config.finder_options)
    scores = score_layers(pos, neg, finder, config.held_out, seed)
    layers = choose_layers(scores, config.n_layers) if config.layers == "auto" else list(config.layers)
    edits, overlaps = [], []
    for layer in layers:
        if not 0 <= layer < pos.shape[1]:
            raise SelfieError(f"init.layers: layer {layer} is outside 0..{pos.shape[1] - 1}")
        minus = finder(neg[:, layer], plain[:, layer])
        plus = finder(pos[:, layer], plain[:, layer])
        overlaps.append(float(plus[0] @ minus[0]))
        edits.append(Edit(layer, orthogonalize(plus, minus), minus, config.alpha))
    info = {"pairs": len(data.pairs), "layer_scores": [round(s, 4) for s in scores], "layers": layers,
            "cosine_plus_minus": [round(c, 4) for c in overlaps],  # before orthogonalising u+ against u-
            "directions": {"plus": [e.plus.shape[0] for e in edits], "minus": [e.minus.shape[0] for e in edits]}}
    logger.info("AlignEZ: layers %s (held-out pair accuracy %s)", layers, [round(scores[layer], 3) for layer in layers])
    return edits, info
