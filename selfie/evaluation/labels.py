"""Judge a labelled preference set (accuracy) or label sampled responses into training pairs (gold labelling)."""

from __future__ import annotations

import logging

import numpy as np

from selfie.errors import SelfieError
from selfie.evaluation.judges import Judge
from selfie.evaluation.stats import bootstrap_ci

logger = logging.getLogger(__name__)


def _assistant_text(row: dict, key: str, i: int) -> str:
    messages = row.get(key)
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) or "content" not in messages[-1]:
        raise SelfieError(f"preferences row {i} (prompt_id {row.get('prompt_id')}): '{key}' must be a list of messages")
    return messages[-1]["content"]


def judge_accuracy(judge: Judge, preferences: list[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    """Fraction of pairs whose chosen response the judge scores strictly above the rejected one.

    Ties count as misses and are reported; `ci95` is a bootstrap interval over pairs.
    """
    if not preferences:
        raise SelfieError("judge accuracy: the preference set is empty")
    prompts = [row["prompt"] for row in preferences]
    chosen = [_assistant_text(row, "chosen", i) for i, row in enumerate(preferences)]
    rejected = [_assistant_text(row, "rejected", i) for i, row in enumerate(preferences)]
    scores = np.asarray(judge.score(prompts + prompts, chosen + rejected), dtype=float)
    c, r = scores[: len(prompts)], scores[len(prompts):]
    correct = (c > r).astype(float)
    return {"accuracy": float(correct.mean()), "n": len(correct), "ties": int((c == r).sum()),
            "margin_mean": float((c - r).mean()), "ci95": bootstrap_ci(correct, n_boot, seed)}


def label_pairs(judge: Judge, responses_rows: list[dict], allow_truncated_chosen: bool = False) -> tuple[list[dict], dict]:
    """Gold labelling: pairs.jsonl rows from responses.jsonl rows, chosen = best-scored, rejected = worst-scored.

    Pair selection is the loop's own (selfie.judge.select_pairs): a response cut at the token limit is
    not chosen unless allowed, rejected is the lowest-scored response whose text differs from the
    chosen one. Returns (pairs, number of prompts dropped per reason).
    """
    from selfie.judge import check_response_rows, select_pairs

    check_response_rows(responses_rows, "responses")
    flat_prompts = [row["prompt"] for row in responses_rows for _ in row["responses"]]
    flat_scores = judge.score(flat_prompts, [r for row in responses_rows for r in row["responses"]])
    judgments, offset = [], 0
    for row in responses_rows:
        judgments.append({"rewards": flat_scores[offset: offset + len(row["responses"])]})
        offset += len(row["responses"])
    pairs, dropped = select_pairs(responses_rows, judgments, allow_truncated_chosen)
    logger.info("labelled %d pairs from %d rows (dropped: %s)", len(pairs), len(responses_rows), dict(dropped) or "none")
    return pairs, dict(dropped)
