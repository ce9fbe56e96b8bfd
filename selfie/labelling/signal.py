"""The label-signal check's arithmetic (docs/METHOD.md 1.2, "Label-signal check"): how often the iteration labeller,
fitted without them, ranks held-out gold seed pairs the way their labels do.

The seed pairs are cut into k folds; a labeller fitted on k-1 folds scores each held-out pair's two responses as
a 2-response prompt of an iteration, and the loop's own pair rules (selfie/labelling/pairs.py, alpha `auto`
included) pick its chosen one. Accuracy = share of the held-out pairs given a pair whose pick is the gold chosen.
The gold chosen response is placed first or second by a seeded coin, so a labeller that cannot tell the two
apart (ties included: the pick takes the first of equals) scores 50% in expectation.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

from selfie.config.schema import EvalConfig, PairRules
from selfie.labelling.pairs import select_pairs
from selfie.stats import bootstrap_ci


def fold_indices(n: int, folds: int, seed: int) -> list[list[int]]:
    """`folds` disjoint, near-equal index sets covering range(n), from a seeded shuffle."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [sorted(order[f::folds]) for f in range(folds)]


def heldout_rows(pairs: Sequence[dict], indices: Sequence[int], seed: int) -> list[dict]:
    """The pairs at `indices` as response rows (responses.jsonl's shape), each with its gold chosen response's
    position (`gold`, 0 or 1) drawn by a coin seeded per pair."""
    rows = []
    for i in indices:
        pair = pairs[i]
        sides = [
            (pair["chosen"][-1]["content"], pair.get("chosen_finished", True)),
            (pair["rejected"][-1]["content"], pair.get("rejected_finished", True)),
        ]
        gold = random.Random(f"{seed}-{i}").randrange(2)
        if gold:
            sides.reverse()
        rows.append(
            {
                "prompt_id": f"seed-{i}",
                "prompt": pair["prompt"],
                "responses": [text for text, _ in sides],
                "finished": [done for _, done in sides],
                "gold": gold,
            }
        )
    return rows


def signal_accuracy(folds: Sequence[tuple[Sequence[dict], Sequence[dict]]], rules: PairRules, seed: int = 0) -> dict:
    """Accuracy of the labeller's picks against the gold responses over every fold's (rows, judgments), with a
    95% bootstrap interval over the pairs. Each fold is paired on its own, as an iteration is (its own `auto`
    alpha); `raw_accuracy` ranks by the reward alone, without the pair rules."""
    correct, raw, alphas, total = [], [], [], 0
    for rows, judgments in folds:
        total += len(rows)
        picked, metrics = select_pairs(rows, judgments, rules)
        gold_text = {row["prompt_id"]: row["responses"][row["gold"]] for row in rows}
        correct += [p["chosen"][-1]["content"] == gold_text[p["prompt_id"]] for p in picked]
        raw += [  # a served judge's unreadable verdict (NaN) ranks nothing
            j["rewards"][row["gold"]] > j["rewards"][1 - row["gold"]]
            for row, j in zip(rows, judgments)
            if not any(math.isnan(r) for r in j["rewards"])
        ]
        alphas.append(metrics["length_penalty"])
    hits = np.array(correct, dtype=float)
    low, high = bootstrap_ci(hits, EvalConfig.n_boot, seed) if len(hits) else (None, None)  # evaluation's resamples
    return {
        "accuracy": float(hits.mean()) if len(hits) else None,
        "ci95_low": low,
        "ci95_high": high,
        "n": len(hits),
        "unpaired": total - len(hits),
        "raw_accuracy": sum(raw) / len(raw) if raw else None,
        "length_penalties": alphas,
    }


def signal_line(signal: dict) -> str:
    """One line for the summary, `selfie status` and the log."""
    if signal.get("skipped"):
        return f"label signal: not checked ({signal['skipped']})"
    if signal["accuracy"] is None:
        return f"label signal: no held-out seed pair survived the pair rules. {WEAK_SIGNAL}"
    low, high = signal["ci95_low"], signal["ci95_high"]
    line = (
        f"label signal ({signal['folds']}-fold, {signal['labeller']}): the labeller picks the seed label's chosen "
        f"response in {signal['accuracy']:.0%} [{low:.0%}, {high:.0%}] of {signal['n']} held-out seed pairs"
    )
    return f"{line}. {WEAK_SIGNAL}" if weak(signal) else line


def seed_choice_lines(choice: dict) -> list[str]:
    """The summary's account of `train.seed_candidates`' choice (selfie/run/seed_choice.py): each candidate's
    settings and held-out accuracy, the chosen one marked."""
    lines = []
    for i, candidate in enumerate(choice["candidates"]):
        settings = ", ".join(f"{k} {v}" for k, v in candidate["settings"].items()) or "the recipe's own"
        s = candidate["label_signal"]
        accuracy = (
            f"{s['accuracy']:.0%} [{s['ci95_low']:.0%}, {s['ci95_high']:.0%}] of {s['n']}"
            if s.get("accuracy") is not None
            else s.get("skipped", "no held-out pair")
        )
        lines.append(f"seed candidate {i} ({settings}): {accuracy}{' <- chosen' if i == choice['chosen'] else ''}")
    return lines


WEAK_SIGNAL = (
    "That is not better than chance (50%): the iterations' self-labels may carry no preference. Try a larger seed, "
    "another judge.labeller (bradley-terry, ensemble, a reward model) or more responses per prompt "
    "(generate.num_responses)"
)


def weak(signal: dict) -> bool:
    """Whether the check ran and its interval reaches down to 50% (or it gave no pair at all)."""
    return not signal.get("skipped") and (signal["accuracy"] is None or signal["ci95_low"] <= 0.5)
