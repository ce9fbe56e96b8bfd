"""AlignEZ: from self-generated pairs to per-layer edits (docs/METHOD.md sections 2.2-2.5).

Which directions are u+ and u-? Taking both from the (y+, y-) pairs makes them parallel (u- = -u+)
and the edit degenerates: (I + a u u^T)(I - u u^T) = I - u u^T, the boost is wiped out. So each is
measured against a neutral reference, the model's own plain answer y0 to the same query:
    u- = finder(h(q + y-), h(q + y0))   what the harmful persona adds to the default answer
    u+ = finder(h(q + y+), h(q + y0))   what the helpful persona adds, then made orthogonal to u-
(the plain answer's last token is the same kind of position as y+'s and y-'s; the bare query's
would add a response-vs-no-response component to both). Orthogonality makes the edit exactly
"remove the u- component, scale the u+ component by 1 + alpha".

At some layers the two still come out nearly parallel (|cos(u+, u-)| > init.parallel_cosine): both
then mostly measure what any persona adds to the plain answer, and what is left of u+ after
orthogonalising is a sliver that two halves of the pairs do not agree on (noise). Such a layer
boosts the direction that separates the helpful answers from the harmful ones, finder(H+, H-),
and removes nothing.

Directions are fitted on the pairs' fit split only; the held-out split (init.held_out) chooses:
layers are ranked by how often their (y+, y-) direction ranks h+ above h-, and how many of them to
edit and alpha (`auto`) by the edited model's mean log-prob margin logp(y+|x) - logp(y-|x) on the
held-out pairs. When no candidate beats the unedited model there, nothing is edited.
"""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfie.edit.alignez_data import AlignEZData
from selfie.edit.apply import Edit, EditHooks
from selfie.edit.config import AlignEZConfig
from selfie.edit.directions import Finder, get_finder, held_out_split, rank_layers, score_layers
from selfie.edit.hidden import collect_states, encode
from selfie.edit.preference import pair_margins
from selfie.errors import SelfieError

logger = logging.getLogger(__name__)

N_LAYERS_GRID = (1, 3, 5)  # init.n_layers: auto tries the best 1, 3 and 5 layers
ALPHA_GRID = (0.5, 1.0, 2.0, 4.0)  # init.alpha: auto tries these


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
    states = collect_states(model, items, tokenizer.pad_token_id, location=config.location, mode="last",
                            batch_size=config.batch_size, desc="alignez states")
    n = len(data.pairs)
    plain_row = {row["prompt_id"]: i for i, row in enumerate(data.plain)}
    plain = states[2 * n:][torch.tensor([plain_row[p["prompt_id"]] for p in data.pairs])]
    return states[:n], states[n:2 * n], plain


def layer_directions(pos: torch.Tensor, neg: torch.Tensor, plain: torch.Tensor, finder: Finder, parallel_cosine: float
                     ) -> tuple[torch.Tensor, torch.Tensor, float, str]:
    """(U+, U-, cos(u+, u-) before orthogonalising, the rule used) at one layer; the states are [N, H]."""
    minus, plus = finder(neg, plain), finder(pos, plain)
    cosine = float(plus[0] @ minus[0])
    if abs(cosine) > parallel_cosine:
        return finder(pos, neg), minus[:0], cosine, "separating"
    return orthogonalize(plus, minus), minus, cosine, "residual"


def residual_agreement(pos: torch.Tensor, neg: torch.Tensor, plain: torch.Tensor, finder: Finder, seed: int) -> float:
    """|cos| between the orthogonalised u+ fitted on two disjoint halves of the pairs: near 1 a direction, near 0 noise."""
    perm = torch.randperm(len(pos), generator=torch.Generator().manual_seed(seed))
    halves = perm[:len(pos) // 2], perm[len(pos) // 2:]
    residuals = [orthogonalize(finder(pos[h], plain[h]), finder(neg[h], plain[h])) for h in halves]
    return abs(float(residuals[0][0] @ residuals[1][0])) if all(len(r) for r in residuals) else 0.0


def candidates(config: AlignEZConfig, ranked: list[int]) -> list[tuple[list[int], float]]:
    """(layers, alpha) settings to try: the grids where a key is `auto`, the given value where it is not."""
    if config.layers != "auto":
        layer_sets = [sorted(config.layers)]
    else:
        counts = N_LAYERS_GRID if config.n_layers == "auto" else (config.n_layers,)
        layer_sets = list({tuple(sorted(ranked[:n])): None for n in counts})  # a small model may repeat a set
    alphas = ALPHA_GRID if config.alpha == "auto" else (config.alpha,)
    return [(list(layers), alpha) for layers in layer_sets for alpha in alphas]


def held_out_margin(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[dict], edits: list[Edit],
                    batch_size: int) -> float:
    """Mean logp(y+|x) - logp(y-|x) over `pairs` with `edits` hooked in (equal to the folded model's)."""
    with EditHooks(model, edits, "mlp"):
        return float(pair_margins(model, tokenizer, pairs, batch_size).mean())


def alignez_edits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: AlignEZData, config: AlignEZConfig,
                  seed: int = 0) -> tuple[list[Edit], dict]:
    """The edits chosen on the held-out pairs (possibly none), and what was measured on the way."""
    pos, neg, plain = pair_states(model, tokenizer, data, config)
    num_layers = pos.shape[1]
    for layer in [] if config.layers == "auto" else config.layers:
        if not 0 <= layer < num_layers:
            raise SelfieError(f"init.layers: layer {layer} is outside 0..{num_layers - 1}")
    finder = get_finder(config.finder, config.finder_options)
    fit, held = held_out_split(len(pos), config.held_out, seed)
    scores = score_layers(pos, neg, finder, config.held_out, seed)  # the same split: fitted on `fit`, scored on `held`
    per_layer = [layer_directions(pos[fit, layer], neg[fit, layer], plain[fit, layer], finder, config.parallel_cosine)
                 for layer in range(num_layers)]
    agreement = [residual_agreement(pos[fit, layer], neg[fit, layer], plain[fit, layer], finder, seed)
                 for layer in range(num_layers)]

    def edits_for(layers: list[int], alpha: float) -> list[Edit]:
        return [Edit(layer, per_layer[layer][0], per_layer[layer][1], alpha) for layer in layers]

    held_pairs = [data.pairs[i] for i in held.tolist()]
    unedited = held_out_margin(model, tokenizer, held_pairs, [], config.batch_size)
    ranked = rank_layers(scores)
    tried = [{"layers": layers, "alpha": alpha,
              "held_out_margin": round(held_out_margin(model, tokenizer, held_pairs, edits_for(layers, alpha), config.batch_size), 4)}
             for layers, alpha in candidates(config, ranked)]
    best = max(tried, key=lambda c: c["held_out_margin"])
    chosen = best if best["held_out_margin"] > unedited or len(tried) == 1 else None
    if chosen is None:
        logger.warning("AlignEZ: no edit raised the held-out margin above the unedited model's (%.3f nats); nothing is edited",
                       unedited)
    layers = chosen["layers"] if chosen else []
    info = {"pairs": len(data.pairs), "fit_pairs": len(fit), "held_out_pairs": len(held),
            "layer_scores": [round(s, 4) for s in scores], "layers": layers, "alpha": chosen["alpha"] if chosen else None,
            "parallel_cosine": config.parallel_cosine,
            "cosine_plus_minus": [round(d[2], 4) for d in per_layer],  # every layer, before orthogonalising
            "residual_agreement": [round(a, 4) for a in agreement],
            "rule": {layer: per_layer[layer][3] for layer in layers},
            "held_out_margin": {"unedited": round(unedited, 4), "edited": chosen["held_out_margin"] if chosen else round(unedited, 4)},
            "candidates": tried}
    logger.info("AlignEZ: layers %s, alpha %s; held-out margin %.3f -> %.3f nats", layers, info["alpha"], unedited,
                info["held_out_margin"]["edited"])
    return edits_for(layers, chosen["alpha"]) if chosen else [], info
