"""Pairwise outcomes and bootstrap intervals: pure numbers, no models."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from selfie.errors import SelfieError


def outcomes(scores_a: Sequence[float], scores_b: Sequence[float]) -> np.ndarray:
    """Per item: 1 when a scores higher, 0.5 on an exact tie, 0 when lower."""
    if len(scores_a) != len(scores_b):
        raise SelfieError(f"win rate: {len(scores_a)} scores for A but {len(scores_b)} for B")
    if not len(scores_a):
        raise SelfieError("win rate: no scored prompts")
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the mean, resampling items with replacement."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))]


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict:
    """How often A beats B item by item, ties counting half, with a 95% bootstrap interval over items."""
    o = outcomes(scores_a, scores_b)
    return {
        "win_rate": float(o.mean()), "wins": int((o == 1).sum()), "ties": int((o == 0.5).sum()),
        "losses": int((o == 0).sum()), "n": len(o), "ci95": bootstrap_ci(o, n_boot, seed),
    }
