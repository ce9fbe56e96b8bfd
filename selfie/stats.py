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


def bootstrap_ci(values: np.ndarray, n_boot: int, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the mean, resampling items with replacement."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))]


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float], n_boot: int, seed: int = 0) -> dict:
    """How often A beats B item by item, ties counting half, with a 95% bootstrap interval over items."""
    o = outcomes(scores_a, scores_b)
    return {
        "win_rate": float(o.mean()),
        "wins": int((o == 1).sum()),
        "ties": int((o == 0.5).sum()),
        "losses": int((o == 0).sum()),
        "n": len(o),
        "ci95": bootstrap_ci(o, n_boot, seed),
    }


def _logistic_fit(x: np.ndarray, y: np.ndarray, iterations: int = 100) -> np.ndarray:
    """Maximum-likelihood (b0, b1) of P(y = 1) = sigmoid(b0 + b1 x) for targets in [0, 1] (Newton's method)."""
    design = np.stack([np.ones_like(x), x], axis=1)
    coef = np.zeros(2)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(design @ coef)))
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + 1e-12 * np.eye(2)
        step = np.linalg.lstsq(hessian, design.T @ (y - p), rcond=None)[0]
        coef = np.clip(coef + step, -30.0, 30.0)  # a perfectly separated set would run off to infinity
        if np.abs(step).max() < 1e-10:
            break
    return coef


def length_adjusted_win_rate(outcome: np.ndarray, length_diff: np.ndarray) -> float:
    """The win rate at equal length: a logistic regression on the length difference alone (docs/METHOD.md 4.3).

    The preference (1 win, 0.5 tie, 0 loss) is regressed on the length difference, normalised as
    tanh(diff / std(diff)); the fitted probability at zero difference is sigmoid(b0).
    """
    scale = length_diff.std()
    x = np.tanh(length_diff / scale) if scale > 0 else np.zeros_like(length_diff, dtype=float)
    if not x.any():  # no length difference to control for
        return float(outcome.mean())
    return float(1.0 / (1.0 + np.exp(-_logistic_fit(x, outcome)[0])))


def length_adjusted(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    lengths_a: Sequence[int],
    lengths_b: Sequence[int],
    n_boot: int,
    seed: int = 0,
) -> dict:
    """Length-adjusted win rate of A over B with a 95% bootstrap interval over items."""
    o = outcomes(scores_a, scores_b)
    diff = np.asarray(lengths_a, dtype=float) - np.asarray(lengths_b, dtype=float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(o), size=(n_boot, len(o)))
    boots = [length_adjusted_win_rate(o[d], diff[d]) for d in draws]
    return {
        "length_adjusted_win_rate": length_adjusted_win_rate(o, diff),
        "length_adjusted_ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
    }
