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
orthogonalising is a sliver that two halves of the pairs do not agree on (noise). Such a layer,
and any layer whose remainder two halves of the pairs agree on poorly (|cos| < 0.5, and less than
on the direction that separates the helpful answers from the harmful ones, finder(H+, H-)),
boosts that direction instead and removes nothing.

Directions are fitted on the pairs' fit split only; the held-out split (init.held_out) chooses:
layers are ranked by how often their (y+, y-) direction ranks h+ above h-, and how many of them to
edit and alpha (`auto`) by the edited model's mean log-prob margin logp(y+|x) - logp(y-|x) on the
held-out pairs, among the candidates that keep the model near itself: the drop in mean per-token
log-prob of its own plain answers (an estimate of the per-token KL from the unedited model) at most
init.max_kl. A margin can always be bought by a large edit that makes every answer less likely; the
budget rules that out. When no allowed candidate beats the unedited model, nothing is edited.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfie.config.schema import AlignEZConfig
from selfie.edit.alignez_data import AlignEZData
from selfie.edit.apply import Edit, EditHooks
from selfie.edit.directions import Finder, get_finder, held_out_split, rank_layers, score_layers
from selfie.edit.preference import pair_margins, per_token_logp
from selfie.errors import SelfieError
from selfie.hidden import collect_states, encode
from selfie.tokens import pad_token_id

logger = logging.getLogger(__name__)

N_LAYERS_GRID = (1, 3, 5)  # init.n_layers: auto tries the best 1, 3 and 5 layers
ALPHA_GRID = (0.5, 1.0, 2.0, 4.0)  # init.alpha: auto tries these
# Halves of the pairs whose remainders are > 60 degrees apart: each estimate is far off, the remainder is noise
# (two random directions in H dimensions have |cos| ~ 1/sqrt(H): 0.04 for H = 576).
MIN_AGREEMENT = 0.5


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
        logger.warning(
            "%d of %d helpful direction(s) lie in the harmful subspace and were dropped", len(rows) - len(kept), len(rows)
        )
    return torch.stack(kept).float() if kept else rows.new_zeros((0, rows.shape[1]))


def pair_states(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: AlignEZData, config: AlignEZConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Last-token states [N, L, H] of q + y+, q + y-, and q + y0 (the plain answer to the pair's query)."""
    items = [encode(tokenizer, p["prompt"], p["chosen"][0]["content"]) for p in data.pairs]
    items += [encode(tokenizer, p["prompt"], p["rejected"][0]["content"]) for p in data.pairs]
    items += [encode(tokenizer, row["prompt"], row["responses"][0]) for row in data.plain]
    states = collect_states(
        model,
        items,
        pad_token_id(tokenizer),
        location=config.location,
        mode="last",
        batch_size=config.batch_size,
        desc="alignez states",
    )
    n = len(data.pairs)
    plain_row = {row["prompt_id"]: i for i, row in enumerate(data.plain)}
    plain = states[2 * n :][torch.tensor([plain_row[p["prompt_id"]] for p in data.pairs])]
    return states[:n], states[n : 2 * n], plain


class LayerDirections(NamedTuple):
    plus: torch.Tensor  # [k+, H], the rows the edit scales by 1 + alpha
    minus: torch.Tensor  # [k-, H], the rows it removes
    cosine: float  # cos(u+, u-) before orthogonalising
    rule: str  # "residual": u+ orthogonalised against u-; "separating": the y+ vs y- direction, nothing removed
    separating: torch.Tensor  # [k, H], the y+ vs y- direction (what ranks the layers)
    agreement: dict[str, float]  # split-half agreement of each rule's direction


def split_half_agreement(fit: Callable[[torch.Tensor], torch.Tensor], n: int, seed: int) -> float:
    """|cos| between the top directions `fit(indices)` gives on two disjoint halves of n pairs: near 1 a direction
    the data agree on, near 0 noise (in H dimensions two random unit vectors have |cos| ~ 1/sqrt(H))."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    first, second = fit(perm[: n // 2]), fit(perm[n // 2 :])
    return abs(float(first[0] @ second[0])) if len(first) and len(second) else 0.0


def layer_directions(
    pos: torch.Tensor, neg: torch.Tensor, plain: torch.Tensor, finder: Finder, parallel_cosine: float, seed: int = 0
) -> LayerDirections:
    """The edit's directions at one layer (the states are [N, H]).

    The residual rule unless u+ and u- are nearly parallel, or two halves of the pairs agree on the remainder
    less than MIN_AGREEMENT and less than on the y+ vs y- direction: scaling a remainder the data do not
    agree on edits noise.
    """
    minus, plus, separating = finder(neg, plain), finder(pos, plain), finder(pos, neg)
    cosine = float(plus[0] @ minus[0])
    agreement = {
        "residual": split_half_agreement(
            lambda h: orthogonalize(finder(pos[h], plain[h]), finder(neg[h], plain[h])), len(pos), seed
        ),
        "separating": split_half_agreement(lambda h: finder(pos[h], neg[h]), len(pos), seed),
    }
    if abs(cosine) > parallel_cosine or agreement["residual"] < min(MIN_AGREEMENT, agreement["separating"]):
        return LayerDirections(separating, minus[:0], cosine, "separating", separating, agreement)
    return LayerDirections(orthogonalize(plus, minus), minus, cosine, "residual", separating, agreement)


def candidates(config: AlignEZConfig, ranked: list[int]) -> list[tuple[list[int], float]]:
    """(layers, alpha) settings to try: the grids where a key is `auto`, the given value where it is not."""
    if config.layers != "auto":
        layer_sets = [sorted(config.layers)]
    else:
        counts = N_LAYERS_GRID if config.n_layers == "auto" else (config.n_layers,)
        layer_sets = list({tuple(sorted(ranked[:n])): None for n in counts})  # a small model may repeat a set
    alphas = ALPHA_GRID if config.alpha == "auto" else (config.alpha,)
    return [(list(layers), alpha) for layers in layer_sets for alpha in alphas]


def held_out_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[dict],
    plain: list[dict],
    edits: list[Edit],
    batch_size: int,
) -> tuple[float, float]:
    """With `edits` hooked in (equal to the folded model): the mean margin logp(y+|x) - logp(y-|x) over `pairs`, and the
    mean log-prob per token of the model's own plain answers `plain`."""
    with EditHooks(model, edits, "mlp"):
        margin = float(pair_margins(model, tokenizer, pairs, batch_size).mean())
        own = per_token_logp(
            model, tokenizer, [row["prompt"] for row in plain], [row["responses"][0] for row in plain], batch_size
        )
    return margin, own


def layer_edits(per_layer: list[LayerDirections], layers: list[int], alpha: float) -> list[Edit]:
    return [Edit(layer, per_layer[layer].plus, per_layer[layer].minus, alpha) for layer in layers]


def check_layers(config: AlignEZConfig, num_layers: int) -> None:
    for layer in [] if config.layers == "auto" else config.layers:
        if not 0 <= layer < num_layers:
            raise SelfieError(f"init.layers: layer {layer} is outside 0..{num_layers - 1}")


def held_out_rows(data: AlignEZData, held: torch.Tensor) -> tuple[list[dict], list[dict]]:
    """The held-out pairs and, for each, the plain answer to its query."""
    held_pairs = [data.pairs[i] for i in held.tolist()]
    plain_rows = {row["prompt_id"]: row for row in data.plain}
    return held_pairs, [plain_rows[p["prompt_id"]] for p in held_pairs]


class Choice(NamedTuple):
    unedited: float  # the unedited model's held-out margin
    tried: list[dict]  # every candidate: layers, alpha, held_out_margin, kl
    chosen: dict | None  # the candidate edited (None: nothing is)


def choose_edit(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: AlignEZData,
    held: torch.Tensor,
    per_layer: list[LayerDirections],
    settings: list[tuple[list[int], float]],
    config: AlignEZConfig,
) -> Choice:
    """The (layers, alpha) setting with the highest held-out margin within the KL budget, if it beats the unedited model
    (a single setting, all keys given, is taken as it is)."""
    held_pairs, held_plain = held_out_rows(data, held)
    unedited, own = held_out_scores(model, tokenizer, held_pairs, held_plain, [], config.batch_size)
    tried = []
    for layers, alpha in settings:
        edits = layer_edits(per_layer, layers, alpha)
        margin, edited_own = held_out_scores(model, tokenizer, held_pairs, held_plain, edits, config.batch_size)
        tried.append({"layers": layers, "alpha": alpha, "held_out_margin": round(margin, 4), "kl": round(own - edited_own, 4)})
    allowed = [c for c in tried if c["kl"] <= config.max_kl] if len(tried) > 1 else tried
    best = max(allowed, key=lambda c: c["held_out_margin"], default=None)
    chosen = best if best and (best["held_out_margin"] > unedited or len(tried) == 1) else None
    if chosen is None:
        logger.warning(
            "AlignEZ: no edit within init.max_kl raised the held-out margin above the unedited model's (%.3f nats); "
            "nothing is edited",
            unedited,
        )
    return Choice(unedited, tried, chosen)


def edit_record(
    data: AlignEZData,
    fit: torch.Tensor,
    held: torch.Tensor,
    scores: list[float],
    per_layer: list[LayerDirections],
    config: AlignEZConfig,
    choice: Choice,
) -> dict:
    """What selfie_edit.json records of an AlignEZ edit: the split, the layer measurements, the candidates, the choice."""
    chosen, unedited = choice.chosen, choice.unedited
    layers = chosen["layers"] if chosen else []
    return {
        "pairs": len(data.pairs),
        "fit_pairs": len(fit),
        "held_out_pairs": len(held),
        "layer_scores": [round(s, 4) for s in scores],
        "layers": layers,
        "alpha": chosen["alpha"] if chosen else None,
        "parallel_cosine": config.parallel_cosine,
        "max_kl": config.max_kl,
        "kl": chosen["kl"] if chosen else 0.0,
        "cosine_plus_minus": [round(d.cosine, 4) for d in per_layer],  # every layer, before orthogonalising
        "agreement": {rule: [round(d.agreement[rule], 4) for d in per_layer] for rule in ("residual", "separating")},
        "rule": {layer: per_layer[layer].rule for layer in layers},
        "held_out_margin": {
            "unedited": round(unedited, 4),
            "edited": chosen["held_out_margin"] if chosen else round(unedited, 4),
        },
        "candidates": choice.tried,
    }


def alignez_edits(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: AlignEZData, config: AlignEZConfig, seed: int = 0
) -> tuple[list[Edit], dict]:
    """The edits chosen on the held-out pairs (possibly none), and what was measured on the way."""
    pos, neg, plain = pair_states(model, tokenizer, data, config)
    num_layers = pos.shape[1]
    check_layers(config, num_layers)
    finder = get_finder(config.finder, config.finder_options)
    fit, held = held_out_split(len(pos), config.held_out, seed)
    per_layer = [
        layer_directions(pos[fit, layer], neg[fit, layer], plain[fit, layer], finder, config.parallel_cosine, seed)
        for layer in range(num_layers)
    ]
    scores = score_layers([d.separating for d in per_layer], pos[held], neg[held])
    choice = choose_edit(model, tokenizer, data, held, per_layer, candidates(config, rank_layers(scores)), config)
    info = edit_record(data, fit, held, scores, per_layer, config, choice)
    logger.info(
        "AlignEZ: layers %s, alpha %s; held-out margin %.3f -> %.3f nats",
        info["layers"],
        info["alpha"],
        choice.unedited,
        info["held_out_margin"]["edited"],
    )
    return layer_edits(per_layer, info["layers"], info["alpha"]) if choice.chosen else [], info
