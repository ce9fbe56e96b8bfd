"""Sample one response per conversation for the edit recipes' self-generated data.

HF `generate` on left-padded batches, seeded once per call with `torch.manual_seed`: the samples
depend on the batch size (the batch shares one RNG), which is fine for a one-off data set. (The
main loop's batch-size-independent sampler is selfie.generate; the edits do not need that guarantee.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    ids.discard(None)
    return sorted(ids)


@torch.no_grad()
def sample(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[dict]], *, max_new_tokens: int,
           temperature: float = 0.7, seed: int = 0, batch_size: int = 8, desc: str = "sample") -> list[tuple[str, bool]]:
    """(text, finished) for each prompt: one sample, temperature only (top-k and top-p off)."""
    stop = _stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out: list[tuple[str, bool]] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", disable=None):
            texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                     for p in prompts[start:start + batch_size]]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            generated = model.generate(**inputs, do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                                       max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad_id)
            for row in generated[:, inputs["input_ids"].shape[1]:].tolist():
                end = next((i for i, t in enumerate(row) if t in stop), None)
                out.append((tokenizer.decode(row[:end], skip_special_tokens=True).strip(), end is not None))
    finally:
        tokenizer.padding_side = side
    return out
