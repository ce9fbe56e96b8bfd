"""The judge stage's labeller: implicit rewards with one weight copy, then pairs (docs/METHOD.md sections 1.4, 1.5).

r(x, y) = beta * (logp_policy(y|x) - logp_reference(y|x)), logp summed over the response tokens
(EOS included when the response finished). The reference is the same weights with the adapter
switched off (`policy.disable_adapter()`), so one copy of the model serves both passes over each
packed batch (selfie/scoring.py). `implicit_rewards` scores tokenised responses; `judge_responses`
writes a stage's judgments (and pairs) around it. (The judges that score for evaluation or label
with another scorer are selfie/evaluation/judges.py.)
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfie.config.schema import JudgeConfig, TrainConfig
from selfie.data import check_response_rows, select_shard
from selfie.io import atomic_write_jsonl
from selfie.labelling.pairs import select_pairs
from selfie.models import unwrap_peft
from selfie.scoring import PromptResponses, SequenceLogps, sequence_logps
from selfie.tokens import pad_token_id, response_token_ids, stop_token_ids

logger = logging.getLogger(__name__)


def tokenised(policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict]) -> list[PromptResponses]:
    """Each row's prompt and scored response ids (selfie.tokens.response_token_ids), from its prompt, responses and
    finished flags."""
    stop_ids = stop_token_ids(unwrap_peft(policy), tokenizer)
    return [
        PromptResponses(*response_token_ids(tokenizer, row["prompt"], row["responses"], row["finished"], stop_ids))
        for row in rows
    ]


def implicit_rewards(
    policy: PreTrainedModel,
    items: Sequence[PromptResponses],
    pad_id: int,
    *,
    beta: float = TrainConfig.beta,
    length_normalize: bool = JudgeConfig.length_normalize,
    token_budget: int = JudgeConfig.token_budget,
    progress: str | None = None,
) -> tuple[list[dict], SequenceLogps]:
    """{rewards, policy_logps, reference_logps, num_tokens} of each item's responses, and the log-probs they came from.

    `policy` is a PeftModel (reference = its base with the adapter disabled) or a plain model (then
    the reference is the policy itself and every reward is 0). With `length_normalize` the logps
    are per-token means, so `rewards = beta * (policy_logps - reference_logps)` still holds.
    """
    views = (contextlib.nullcontext, policy.disable_adapter) if isinstance(policy, PeftModel) else (contextlib.nullcontext,)
    scores = sequence_logps(policy, items, pad_id, token_budget, views, progress)
    judgments = []
    for item, pol, ref in zip(items, scores.logps[0], scores.logps[-1]):
        counts = [len(r) for r in item.responses]
        if length_normalize:
            pol = [v / max(c, 1) for v, c in zip(pol, counts)]
            ref = [v / max(c, 1) for v, c in zip(ref, counts)]
        judgments.append(
            {
                "rewards": [beta * (p - r) for p, r in zip(pol, ref)],
                "policy_logps": pol,
                "reference_logps": ref,
                "num_tokens": counts,
            }
        )
    return judgments, scores


def judge_responses(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    responses: list[dict],
    output: str | Path,
    pairs_output: str | Path | None,
    *,
    beta: float = TrainConfig.beta,
    judge: JudgeConfig | None = None,
    shard: tuple[int, int] = (0, 1),
) -> dict:
    """Write judgments.jsonl (and pairs.jsonl, made by the pair rules of `judge`, the recipe's judge: section,
    default JudgeConfig()) for this shard's rows of `responses`; return metrics.

    The judgments are `implicit_rewards`' of the rows, each with its prompt_id, in the rows' order.
    """
    judge = judge or JudgeConfig()  # its ranges were checked when it was built
    check_response_rows(responses, "responses")
    rows = select_shard(responses, shard)
    items = tokenised(policy, tokenizer, rows)
    policy.eval()
    start = time.perf_counter()
    rewards, scores = implicit_rewards(
        policy,
        items,
        pad_token_id(tokenizer),
        beta=beta,
        length_normalize=judge.scoring.length_normalize,
        token_budget=judge.scoring.token_budget,
        progress="judge",
    )
    seconds = time.perf_counter() - start
    judgments = [{"prompt_id": row["prompt_id"], **judged} for row, judged in zip(rows, rewards)]
    atomic_write_jsonl(output, judgments)
    metrics = {
        "prompts": len(rows),
        "responses": sum(len(j["rewards"]) for j in judgments),
        "response_tokens": sum(sum(j["num_tokens"]) for j in judgments),
        "tokens": scores.tokens,
        "padded_tokens": scores.padded_tokens,
        "seconds": round(seconds, 3),
        "tokens_per_second": scores.tokens / seconds if seconds else None,
    }
    if pairs_output is not None:
        pairs, label_metrics = select_pairs(rows, judgments, judge.rules)
        atomic_write_jsonl(pairs_output, pairs)
        metrics.update(label_metrics, pairs_per_second=len(pairs) / seconds if seconds else None)
    logger.info("judged %d prompts in %.1f s -> %s", len(rows), seconds, output)
    return metrics
