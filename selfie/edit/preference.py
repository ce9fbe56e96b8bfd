"""The model's own preference between two answers (summed response log-probs and their margin), and how far an
edit moved the model away from its own answers.

AlignEZ chooses its layers and alpha by the margin on held-out self-generated pairs (the edit that makes
the model prefer the helpful answer over the harmful one most, on pairs the directions were not fitted
on) among the edits whose drift from the model's own plain answers stays within a budget;
scripts/benchmarks/edit.py reports the margin before and after each edit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfie.hidden import encode
from selfie.scoring import PromptResponses, sequence_logps
from selfie.tokens import pad_token_id


def response_logps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[dict]],
    responses: Sequence[str],
    batch_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each response's tokens (as generated, no end-of-turn token) after its prompt, float64,
    and each response's token count.

    Scored by selfie/scoring.py, the judge's log-prob path: each response packed after its prompt, only the response
    positions projected onto the vocabulary. A batch holds at most the padded tokens of `batch_size` of the longest
    prompt + response.
    """
    items = [encode(tokenizer, p, y) for p, y in zip(prompts, responses)]
    rows = [PromptResponses(item.ids[: item.prompt_len], [item.ids[item.prompt_len :]]) for item in items]
    budget = batch_size * max((len(row) for row in rows), default=1)
    (logps,) = sequence_logps(model, rows, pad_token_id(tokenizer), budget).logps
    sums = torch.tensor([row_logps[0] for row_logps in logps], dtype=torch.float64)
    return sums, torch.tensor([len(row.responses[0]) for row in rows], dtype=torch.long)


def pair_margins(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[dict], batch_size: int = 8
) -> torch.Tensor:
    """logp(chosen | prompt) - logp(rejected | prompt) of each pairs.jsonl row, in nats."""
    prompts = [p["prompt"] for p in pairs]
    chosen, _ = response_logps(model, tokenizer, prompts, [p["chosen"][0]["content"] for p in pairs], batch_size)
    rejected, _ = response_logps(model, tokenizer, prompts, [p["rejected"][0]["content"] for p in pairs], batch_size)
    return chosen - rejected


def per_token_logp(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[dict]],
    responses: Sequence[str],
    batch_size: int = 8,
) -> float:
    """Mean log-prob per response token over all the responses.

    For responses the unedited model sampled, its value there minus the edited model's estimates the
    per-token KL divergence of the edited model from the unedited one.
    """
    sums, counts = response_logps(model, tokenizer, prompts, responses, batch_size)
    return float(sums.sum() / counts.sum().clamp_min(1))
