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

from selfie.edit.hidden import encode, pad_batch
from selfie.projection import logit_softcap, output_layer, token_logps


@torch.no_grad()
def response_logps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[dict]],
    responses: Sequence[str],
    batch_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each response's tokens (as generated, no end-of-turn token) after its prompt, float64,
    and each response's token count.

    Only the response positions are projected onto the vocabulary, through the shared tiled projection
    (no [batch, length, vocab] logits).
    """
    items = [encode(tokenizer, p, y) for p, y in zip(prompts, responses)]
    device = next(model.parameters()).device
    head, softcap = output_layer(model), logit_softcap(model)
    out = torch.zeros(len(items), dtype=torch.float64)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = pad_batch(chunk, tokenizer.pad_token_id, "right", device)
        hidden = model.get_decoder()(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
        ).last_hidden_state
        rows, cols = batch.response_index(chunk)
        logps = token_logps([(1.0, hidden[rows, cols - 1])], batch.input_ids[rows, cols], head.weight, head.bias, softcap)
        sums = torch.zeros(len(chunk), dtype=torch.float64, device=device).index_add_(0, rows, logps.double())
        out[start : start + len(chunk)] = sums.cpu()
    return out, torch.tensor([len(item.ids) - item.prompt_len for item in items])


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
