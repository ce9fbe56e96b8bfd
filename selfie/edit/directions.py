"""Direction finders: which unit vectors separate positive from negative hidden states (docs/METHOD.md sections 2.3, 2.4).

A finder maps paired states `pos`, `neg` ([N, H], row i of each from the same prompt) to
orthonormal rows [k, H] whose sign is fixed so that positives project higher than negatives on
average. Finders live in `FINDERS`; `@register("name")` adds one. Each layer is scored by how often
its top direction ranks h+ above h- on held-out pairs (`rank_layers` orders them).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence

import torch

from selfie.errors import SelfieError

logger = logging.getLogger(__name__)

Finder = Callable[..., torch.Tensor]
FINDERS: dict[str, Finder] = {}


def register(name: str) -> Callable[[Finder], Finder]:
    def add(fn: Finder) -> Finder:
        FINDERS[name] = fn
        return fn

    return add


def get_finder(name: str, options: dict | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The finder `name` with its options bound; unknown names and options are errors."""
    if name not in FINDERS:
        raise SelfieError(f"init.finder: unknown direction finder '{name}' (known: {', '.join(sorted(FINDERS))})")
    fn, options = FINDERS[name], dict(options or {})
    accepted = list(inspect.signature(fn).parameters)[2:]
    for key in options:
        if key not in accepted:
            raise SelfieError(
                f"init.finder_options.{key}: not an option of finder '{name}' (options: {', '.join(accepted) or 'none'})"
            )
    return lambda pos, neg: fn(pos, neg, **options)


def orient(directions: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Flip each direction so that the mean of <h+ - h-, u> is positive (SVD and CCS signs are arbitrary)."""
    signs = torch.sign(((pos - neg) @ directions.T).mean(dim=0))
    signs[signs == 0] = 1
    return directions * signs[:, None]


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@register("svd")
def svd_directions(
    pos: torch.Tensor, neg: torch.Tensor, variance: float | None = None, max_cosine: float = 0.8, min_pairs: int = 2
) -> torch.Tensor:
    """Top right singular vector(s) of the differences H+ - H- (AlignEZ).

    Pairs whose two states are nearly the same (cosine > `max_cosine`) carry little signal and are
    dropped; if fewer than `min_pairs` survive, the `min_pairs` least similar pairs are kept.
    `variance` None keeps the top vector; a fraction keeps the fewest vectors covering it.
    """
    cosine = torch.nn.functional.cosine_similarity(pos, neg, dim=-1)
    keep = cosine <= max_cosine
    if int(keep.sum()) < min(min_pairs, len(pos)):
        logger.debug(
            "svd: %d of %d pairs have cosine <= %.2f; keeping the %d least similar",
            int(keep.sum()),
            len(pos),
            max_cosine,
            min_pairs,
        )
        keep = torch.zeros_like(keep)
        keep[cosine.argsort()[:min_pairs]] = True
    diffs = (pos - neg)[keep].double()
    _, s, vh = torch.linalg.svd(diffs, full_matrices=False)
    k = 1
    if variance is not None:
        share = (s**2).cumsum(0) / (s**2).sum()
        k = int((share < variance).sum()) + 1
    return orient(vh[:k].float(), pos, neg)


@register("mean_diff")
def mean_diff_direction(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    return _unit((pos - neg).mean(dim=0))[None]


@register("ccs")
def ccs_direction(
    pos: torch.Tensor, neg: torch.Tensor, steps: int = 1000, lr: float = 1e-2, restarts: int = 4, seed: int = 0
) -> torch.Tensor:
    """Contrast-consistent search (Burns et al.): a linear probe p = sigmoid(w.h + b) trained with
    L = mean(min(p+, p-)^2) + mean((p+ - (1 - p-))^2), best of `restarts`; the direction is w / |w|.

    Burns normalises each set separately, which suits pairs whose polarity is unknown; here the
    sets are positives and negatives by construction, so both are centred together (separate
    centring would remove exactly the difference we look for) and scaled by their mean norm.
    """
    both = torch.cat([pos, neg]).double()
    center, scale = both.mean(dim=0), (both - both.mean(dim=0)).norm(dim=-1).mean().clamp_min(1e-12)
    x_pos, x_neg = (pos.double() - center) / scale, (neg.double() - center) / scale
    generator = torch.Generator().manual_seed(seed)
    best, best_loss = None, float("inf")
    for _ in range(restarts):
        w = (torch.randn(pos.shape[1], generator=generator, dtype=torch.float64) / pos.shape[1] ** 0.5).requires_grad_()
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.Adam([w, b], lr=lr)
        for _ in range(steps):
            p_pos, p_neg = torch.sigmoid(x_pos @ w + b), torch.sigmoid(x_neg @ w + b)
            loss = torch.minimum(p_pos, p_neg).pow(2).mean() + (p_pos - (1 - p_neg)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if loss.item() < best_loss:
            best, best_loss = w.detach(), loss.item()
    return orient(_unit(best).float()[None], pos, neg)


def pair_accuracy(direction: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Share of pairs with <h+, u> > <h-, u> for the top direction u."""
    u = direction[0] if direction.dim() == 2 else direction
    return float(((pos - neg) @ u > 0).float().mean())


def held_out_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices): a seeded permutation, at least one pair on each side."""
    if n < 2:
        raise SelfieError(f"need at least 2 preference pairs to find and score directions, got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = min(max(1, round(n * fraction)), n - 1)
    return perm[held:], perm[:held]


def score_layers(directions: Sequence[torch.Tensor], pos: torch.Tensor, neg: torch.Tensor) -> list[float]:
    """Pair accuracy of each layer's direction (fitted elsewhere) on the states `pos`, `neg` [N, L, H] of held-out pairs."""
    return [pair_accuracy(direction, pos[:, layer], neg[:, layer]) for layer, direction in enumerate(directions)]


def rank_layers(scores: Sequence[float]) -> list[int]:
    """Layer indices from the best score to the worst (ties go to the earlier layer)."""
    return sorted(range(len(scores)), key=lambda layer: (-scores[layer], layer))
