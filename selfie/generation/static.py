"""The `static` generation backend: length-sorted batches of prompts, each prefilled once and decoded by a small loop
in which every row draws from its own generator (selfie/generation/sampler.py)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from selfie.generation.sampler import Item, Response, Samples, SamplingSettings, draw


@torch.inference_mode()
def sample_batch(
    model: PreTrainedModel, prompts: list[list[int]], generators: list[list[torch.Generator]], s: SamplingSettings
) -> list[list[Response]]:
    """Sample len(generators[p]) continuations of each prompt p; returns (token ids without the stop token, finished).

    The prompts are prefilled once (left padded) and their KV cache repeated for their K rows; rows
    that stop leave the batch so the rest decode faster.
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), s.pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    repeats = torch.tensor([len(g) for g in generators])
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    index = torch.repeat_interleave(torch.arange(len(prompts)), repeats).to(device)
    cache.batch_select_indices(index)
    logits, mask, positions = out.logits[index, -1], mask[index], positions[index, -1:]

    rows_gen = [g for gens in generators for g in gens]
    tokens: list[list[int]] = [[] for _ in rows_gen]
    finished = [False] * len(rows_gen)
    active = list(range(len(rows_gen)))  # batch position j holds row active[j]
    for step in range(s.max_new_tokens):
        drawn = draw(logits.float(), [rows_gen[r] for r in active], s.temperature, s.top_p).tolist()
        keep = []
        for j, (row, token) in enumerate(zip(active, drawn)):
            if token in s.stop_ids:
                finished[row] = True
            else:
                tokens[row].append(token)
                keep.append(j)
        if not keep or step == s.max_new_tokens - 1:
            break
        if len(keep) < len(active):
            select = torch.tensor(keep, device=device)
            cache.batch_select_indices(select)
            mask, positions = mask[select], positions[select]
            active = [active[j] for j in keep]
            drawn = [drawn[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        positions = positions + 1
        next_ids = torch.tensor(drawn, device=device).unsqueeze(1)
        out = model(input_ids=next_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1]

    results, r = [], 0
    for gens in generators:
        results.append([(tokens[r + k], finished[r + k]) for k in range(len(gens))])
        r += len(gens)
    return results


def sample_static(model: PreTrainedModel, items: list[Item], s: SamplingSettings) -> Samples:
    """Batches of batch_size // K prompts, shortest prompts first (a batch holds prompts of similar length)."""
    items = sorted(items, key=lambda e: (len(e[0]), e[1]["prompt_id"]))
    for b in range(0, len(items), s.prompts_per_batch):
        chunk = items[b : b + s.prompts_per_batch]
        rows = [row for _, row in chunk]
        yield list(zip(rows, sample_batch(model, [ids for ids, _ in chunk], s.generators(rows), s)))
