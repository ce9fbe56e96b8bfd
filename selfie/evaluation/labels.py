"""Judge a labelled preference set (accuracy) or label sampled responses into training pairs (gold labelling)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from selfie.config.schema import EvalConfig
from selfie.data import check_response_rows, select_shard
from selfie.errors import SelfieError
from selfie.evaluation.judges import Judge
from selfie.io import ResumableJsonl
from selfie.stats import bootstrap_ci
from selfie.tokens import response_token_ids

logger = logging.getLogger(__name__)

ROWS_PER_WRITE = 32  # prompts scored between two appends to the resume file (each append is fsynced)


def _assistant_text(row: dict, key: str, i: int) -> str:
    messages = row.get(key)
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) or "content" not in messages[-1]:
        raise SelfieError(f"preferences row {i} (prompt_id {row.get('prompt_id')}): '{key}' must be a list of messages")
    return messages[-1]["content"]


def _chosen_rejected_scores(judge: Judge, pairs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The judge's scores of each pair's chosen and rejected response, in one call."""
    prompts = [row["prompt"] for row in pairs]
    chosen = [_assistant_text(row, "chosen", i) for i, row in enumerate(pairs)]
    rejected = [_assistant_text(row, "rejected", i) for i, row in enumerate(pairs)]
    scores = np.asarray(judge.score(prompts + prompts, chosen + rejected), dtype=float)
    return scores[: len(pairs)], scores[len(pairs) :]


def judge_accuracy(judge: Judge, preferences: list[dict], n_boot: int = EvalConfig.n_boot, seed: int = 0) -> dict:
    """Fraction of pairs whose chosen response the judge scores strictly above the rejected one.

    Ties count as misses and are reported; pairs without a readable verdict are left out and counted (`unjudged`);
    `ci95` is a bootstrap interval over pairs.
    """
    if not preferences:
        raise SelfieError("judge accuracy: the preference set is empty")
    c, r = _chosen_rejected_scores(judge, preferences)
    judged = ~(np.isnan(c) | np.isnan(r))  # a served judge's unreadable verdict leaves its pair out, counted
    if not judged.any():
        raise SelfieError(f"judge accuracy: the judge gave no readable verdict on any of {len(c)} pairs")
    c, r = c[judged], r[judged]
    correct = (c > r).astype(float)
    return {
        "accuracy": float(correct.mean()),
        "n": len(correct),
        "unjudged": int((~judged).sum()),
        "ties": int((c == r).sum()),
        "margin_mean": float((c - r).mean()),
        "ci95": bootstrap_ci(correct, n_boot, seed),
    }


def score_responses(
    judge: Judge, responses_rows: list[dict], tokenizer: PreTrainedTokenizerBase, stop_ids: set[int]
) -> list[dict]:
    """judgments.jsonl rows from a judge's scores: `rewards` are its scores, `num_tokens` the responses' lengths
    as the loop scores and trains them (so a length penalty means the same whatever the labeller)."""
    check_response_rows(responses_rows, "responses")
    flat_prompts = [row["prompt"] for row in responses_rows for _ in row["responses"]]
    flat_responses = [r for row in responses_rows for r in row["responses"]]
    # a pairwise judge scores under both orders: the pair rules take a pair's `agreement` from them
    members = judge.score_members(flat_prompts, flat_responses) if hasattr(judge, "score_members") else None
    flat_scores = [sum(s) / len(s) for s in zip(*members)] if members else judge.score(flat_prompts, flat_responses)
    served = getattr(judge, "served_model", None)
    judgments, offset = [], 0
    for row in responses_rows:
        k = len(row["responses"])
        _, ids = response_token_ids(tokenizer, row["prompt"], row["responses"], row["finished"], stop_ids)
        judged = {"prompt_id": row["prompt_id"], "rewards": flat_scores[offset : offset + k], "num_tokens": [len(i) for i in ids]}
        if members:
            judged["member_rewards"] = [m[offset : offset + k] for m in members]
        if served:
            judged["judge_model"] = served
        judgments.append(judged)
        offset += k
    return judgments


def label_responses(
    judge: Judge,
    responses_rows: list[dict],
    output: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    stop_ids: set[int],
    shard: tuple[int, int] = (0, 1),
    rows_per_write: int = ROWS_PER_WRITE,
) -> dict:
    """Write the judgments of this shard's rows of `responses_rows` to `output`; return metrics.

    Scores go to `<output>.partial` `rows_per_write` prompts at a time, so a rerun after an interruption skips the
    prompts already scored (the judge is called once per response, never twice)."""
    mine = select_shard(responses_rows, shard)
    start, writer = time.perf_counter(), ResumableJsonl(output)
    todo = [row for row in mine if row["prompt_id"] not in writer.done_keys]
    if len(todo) < len(mine):
        logger.info("resuming %s: %d of %d prompts already scored", output, len(mine) - len(todo), len(mine))
    try:
        for i in range(0, len(todo), rows_per_write):
            writer.append(score_responses(judge, todo[i : i + rows_per_write], tokenizer, stop_ids))
    finally:
        writer.close()
    writer.finish()  # the rows are in shard order: the resumed ones, then the rest
    return {"prompts": len(mine), "resumed": len(mine) - len(todo), "seconds": round(time.perf_counter() - start, 3)}


def pair_agreement(judge: Judge, pairs: list[dict]) -> float | None:
    """Share of pairs whose chosen response `judge` scores strictly above the rejected one (None: no pairs)."""
    if not pairs:
        return None
    c, r = _chosen_rejected_scores(judge, pairs)
    return float((c > r).mean())
