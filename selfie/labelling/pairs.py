"""From scored responses to training pairs: truncation policy, length penalty, min-max selection, replay.

Every labeller (the implicit reward, a reward model, a Python function) gives one score per response;
pairs are then made the same way whatever the labeller:

    shaped_i = score_i - alpha * |y_i| - [policy = penalize] * truncation_penalty * [y_i truncated]
    chosen   = argmax shaped over the candidates (policy drop: finished responses only; else all)
    rejected = argmin shaped over the responses whose text differs from the chosen one

|y| is the response's token count as scored. alpha is `length_penalty`, or with `auto` the value that
makes chosen and rejected equally long on average over the whole iteration (DICE's length-regularised
reward). With `min_margin_quantile` q > 0, the pairs whose shaped margin (shaped chosen - shaped rejected:
the labeller's confidence in its pick) is below the q-quantile of the iteration's shaped margins are dropped
(a confidence filter, the alternative to refine.alpha's label smoothing of low-margin pairs). An ensemble's
judgments carry each member's rewards (a pairwise judge's: each order's): its pairs keep `agreement`, the share of
members whose shaped scores rank chosen above rejected, and those below `min_agreement` are dropped. A prompt
whose scores hold a NaN (a served judge's verdict that could not be read) gives no pair (`unjudged`).

Anchored rows (`judge.anchored`: the row's `anchor` is the index of pi_init's response among them, Temporal
Self-Rewarding's anchored rejection) pair the best of the policy's responses against pi_init's: the anchor is never
chosen and always the rejected one; a prompt whose anchor scores above every policy response gives no pair
(`anchor_preferred`: the labeller does not see pi_{t-1} beating pi_init there).

The rules (truncated, truncation_penalty, length_penalty, min_margin_quantile, min_agreement) are PairRules, the
pairing keys of the recipe's judge: section (JudgeConfig.rules), whose defaults and ranges are the ones a recipe gets. Pairs keep `margin` = raw score(chosen) -
raw score(rejected) and whether each side finished, so the trainer can render a truncated response exactly as
it was judged (no end-of-turn token).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from collections.abc import Sequence

import numpy as np

from selfie.config.schema import DataConfig, JudgeConfig, PairRules
from selfie.errors import SelfieError

DROP_REASONS = ("all_truncated", "identical", "single_response", "unjudged", "anchor_preferred", "low_margin", "disagreement")
AUTO_ITERATIONS = 60  # bisection steps for `auto`: alpha to ~1e-18 of its bracket


Pick = tuple[int, int, float] | str  # (chosen, rejected, shaped margin), or why the prompt gives no pair


def _shaped(scores: Sequence[float], lengths: Sequence[int], finished: Sequence[bool], rules: PairRules, alpha: float):
    """score - alpha * |y| - the truncation penalty (under `penalize`) of each response."""
    penalty = rules.truncation_penalty if rules.truncated == "penalize" else 0.0
    return [s - alpha * n - (0.0 if done else penalty) for s, n, done in zip(scores, lengths, finished)]


def _pick(
    scores: Sequence[float],
    lengths: Sequence[int],
    finished: Sequence[bool],
    texts: Sequence[str],
    rules: PairRules,
    alpha: float,
    anchor: int | None = None,
) -> Pick:
    """(chosen, rejected, shaped margin) of one prompt's responses, or the reason it gives no pair; `anchor`: the
    index of the response that must be the rejected one."""
    if len(texts) < 2:
        return "single_response"
    if any(math.isnan(s) for s in scores):  # a served judge's verdict that could not be read
        return "unjudged"
    shaped = _shaped(scores, lengths, finished, rules, alpha)
    candidates = [i for i, done in enumerate(finished) if (done or rules.truncated != "drop") and i != anchor]
    if not candidates:
        return "all_truncated"
    chosen = max(candidates, key=lambda i: shaped[i])
    others = [i for i in range(len(texts)) if texts[i] != texts[chosen] and (anchor is None or i == anchor)]
    if not others:
        return "identical"
    rejected = min(others, key=lambda i: shaped[i])
    if anchor is not None and shaped[anchor] > shaped[chosen]:
        return "anchor_preferred"
    return chosen, rejected, shaped[chosen] - shaped[rejected]


def _picks(responses: Sequence[dict], judgments: Sequence[dict], rules: PairRules, alpha: float) -> list[Pick]:
    return [
        _pick(j["rewards"], j["num_tokens"], r["finished"], r["responses"], rules, alpha, r.get("anchor"))
        for r, j in zip(responses, judgments)
    ]


def _length_gap(picks: list[Pick], lengths: list[Sequence[int]]) -> float:
    """Mean |chosen| - mean |rejected| over the prompts that give a pair."""
    gaps = [lengths[n][p[0]] - lengths[n][p[1]] for n, p in enumerate(picks) if not isinstance(p, str)]
    return sum(gaps) / len(gaps) if gaps else 0.0


def auto_length_penalty(responses: Sequence[dict], judgments: Sequence[dict], rules: PairRules) -> float:
    """The alpha at which chosen and rejected are, on average, equally long (as near as the data allows).

    The length gap can only fall as alpha grows (a larger alpha never picks a longer chosen or a shorter
    rejected), so bisection finds where it reaches zero; of the two sides of that step the one with the
    smaller |gap| wins (ties: the smaller |alpha|). When no alpha closes the gap (under `drop` a finished
    chosen may always be the shorter one), the answer is the smallest |alpha| that narrows it the most,
    not an unbounded one that would rank by length alone.
    """
    lengths = [j["num_tokens"] for j in judgments]

    def gap(alpha: float) -> float:
        return _length_gap(_picks(responses, judgments, rules, alpha), lengths)

    if gap(0.0) == 0:
        return 0.0
    sign = 1.0 if gap(0.0) > 0 else -1.0  # chosen longer: penalise length; shorter: reward it
    spread = (
        2 * max((abs(s) for j in judgments for s in j["rewards"] if not math.isnan(s)), default=0.0)
        + rules.truncation_penalty
        + 1e-6
    )
    floor = max(0.0, sign * gap(sign * spread * 1e9))  # the gap left when length alone decides
    near, far = 0.0, sign * spread
    while sign * gap(far) > floor:
        far *= 2
    for _ in range(AUTO_ITERATIONS):
        mid = (near + far) / 2
        if sign * gap(mid) > floor:
            near = mid
        else:
            far = mid
    return far if floor else min((near, far), key=lambda a: (abs(gap(a)), abs(a)))


def select_pairs(responses: Sequence[dict], judgments: Sequence[dict], rules: PairRules | None = None) -> tuple[list[dict], dict]:
    """Pairs of one iteration and their label diagnostics, made by `rules` (None: the recipe's defaults).

    `responses` are responses.jsonl rows, `judgments` rows with `rewards` and `num_tokens` in the same order.
    Returns (pairs, metrics): metrics hold the alpha used, drop counts and the label diagnostics.
    """
    if len(responses) != len(judgments):
        raise SelfieError(f"pairs: {len(responses)} response rows but {len(judgments)} judgments")
    rules = JudgeConfig().rules if rules is None else rules
    keep = dataclasses.replace(rules, truncated="keep")  # what would have been picked had truncation not counted
    alpha = auto_length_penalty(responses, judgments, rules) if rules.length_penalty == "auto" else float(rules.length_penalty)
    picks = _picks(responses, judgments, rules, alpha)
    dropped = Counter(p for p in picks if isinstance(p, str))
    floor = _margin_floor([p[2] for p in picks if not isinstance(p, str)], rules.min_margin_quantile)
    pairs, by_truncation = [], 0
    for row, judged, pick in zip(responses, judgments, picks):
        if isinstance(pick, str):
            continue
        if pick[2] < floor:
            dropped["low_margin"] += 1
            continue
        pair = _pair_row(row, judged, *pick[:2])
        if "member_rewards" in judged:  # an ensemble's or pairwise judge's: how many members rank the pair alike
            pair["agreement"] = _agreement(judged, row["finished"], pick, rules, alpha)
            if pair["agreement"] < rules.min_agreement:
                dropped["disagreement"] += 1
                continue
        scores, lengths, texts, finished = judged["rewards"], judged["num_tokens"], row["responses"], row["finished"]
        by_truncation += pick[:2] != _pick(scores, lengths, finished, texts, keep, alpha, row.get("anchor"))[:2]
        pairs.append(pair)
    return pairs, {
        "pairs": len(pairs),
        "dropped": {reason: dropped[reason] for reason in DROP_REASONS},
        "length_penalty": alpha,
        **label_diagnostics(pairs, by_truncation),
    }


def _pair_row(row: dict, judged: dict, chosen: int, rejected: int) -> dict:
    """pairs.jsonl's row of one prompt's (chosen, rejected) responses."""
    scores, lengths, texts, finished = judged["rewards"], judged["num_tokens"], row["responses"], row["finished"]
    return {
        "prompt_id": row["prompt_id"],
        "prompt": row["prompt"],
        "chosen": [{"role": "assistant", "content": texts[chosen]}],
        "rejected": [{"role": "assistant", "content": texts[rejected]}],
        "margin": scores[chosen] - scores[rejected],
        "chosen_finished": finished[chosen],
        "rejected_finished": finished[rejected],
        "chosen_tokens": lengths[chosen],
        "rejected_tokens": lengths[rejected],
    }


def _agreement(judged: dict, finished: Sequence[bool], pick: tuple[int, int, float], rules: PairRules, alpha: float) -> float:
    """Share of the ensemble's members whose own shaped scores put the chosen response above the rejected one."""
    chosen, rejected, _ = pick
    shaped = [_shaped(rewards, judged["num_tokens"], finished, rules, alpha) for rewards in judged["member_rewards"]]
    return sum(s[chosen] > s[rejected] for s in shaped) / len(shaped)


def _margin_floor(margins: Sequence[float], quantile: float) -> float:
    """The shaped margin a pair needs to be kept: the `quantile` of the iteration's margins (0: keep every pair)."""
    return float(np.quantile(margins, quantile)) if quantile and margins else -math.inf


def label_diagnostics(pairs: Sequence[dict], decided_by_truncation: int) -> dict:
    """What decided the labels: lengths of chosen vs rejected, the truncation rule, negative raw margins."""
    n = len(pairs)
    mean = lambda key: sum(p[key] for p in pairs) / n if n else None  # noqa: E731
    return {
        "margin_mean": mean("margin"),
        "negative_margin": sum(p["margin"] < 0 for p in pairs),
        "chosen_tokens_mean": mean("chosen_tokens"),
        "rejected_tokens_mean": mean("rejected_tokens"),
        "chosen_truncated": sum(not p["chosen_finished"] for p in pairs),
        "rejected_truncated": sum(not p["rejected_finished"] for p in pairs),
        "decided_by_truncation": decided_by_truncation / n if n else None,
    }


def with_replay(pairs: list[dict], seed_pairs: Sequence[dict], fraction: float, seed: int) -> list[dict]:
    """The iteration's pairs plus seed pairs making up `fraction` of the result (DICE's experience replay).

    round(fraction / (1 - fraction) * len(pairs)) seed pairs are drawn without replacement (the seed set is
    reshuffled and drawn again when more are needed), deterministically under `seed`.
    """
    DataConfig.require_in_range("replay", fraction)
    count = round(fraction / (1.0 - fraction) * len(pairs))
    if not count:
        return list(pairs)
    if not seed_pairs:
        raise SelfieError("data.replay: the seed stage has no pairs to replay")
    rng, drawn = random.Random(seed), []
    while len(drawn) < count:
        order = list(seed_pairs)
        rng.shuffle(order)
        drawn += order[: count - len(drawn)]
    return list(pairs) + [{**row, "replay": True} for row in drawn]
