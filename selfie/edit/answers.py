"""The model's one answer to each conversation, for the edit recipes' self-generated data.

HF `generate` on left-padded batches, seeded once per call with `torch.manual_seed`: the samples
depend on the batch size (the batch shares one RNG), which is fine for a one-off data set. (The
main loop's batch-size-independent sampler is selfie.generation.generate; the edits do not need that guarantee.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfie.tokens import chat_ids, pad_token_id, stop_token_ids


@torch.no_grad()
def model_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[dict]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int,
    desc: str = "answers",
) -> list[tuple[str, bool]]:
    """(text, finished) for each prompt: one sampled answer, temperature only (top-k and top-p off)."""
    stop, pad_id = sorted(stop_token_ids(model, tokenizer)), pad_token_id(tokenizer)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out: list[tuple[str, bool]] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", disable=None):
            ids = [chat_ids(tokenizer, p, add_generation_prompt=True) for p in prompts[start : start + batch_size]]
            inputs = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(device)
            generated = model.generate(
                **inputs,
                do_sample=True,
                temperature=temperature,
                top_p=1.0,
                top_k=0,
                max_new_tokens=max_new_tokens,
                eos_token_id=stop,
                pad_token_id=pad_id,
            )
            for row in generated[:, inputs["input_ids"].shape[1] :].tolist():
                end = next((i for i, t in enumerate(row) if t in stop), None)
                out.append((tokenizer.decode(row[:end], skip_special_tokens=True).strip(), end is not None))
    finally:
        tokenizer.padding_side = side
    return out
