"""What every generation backend shares: each (prompt, k) row's own seed and generator, the one-token draw, the
settings a backend samples with, and the shape of what a backend yields.

A row's tokens come from its own `torch.Generator`, seeded from (run seed, prompt_id, k), so a prompt's responses do
not depend on the batch size, the batch order or which other prompts share its batch (HF generate shares one RNG
across the batch).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence

import torch


def row_seed(seed: int, prompt_id: str, k: int) -> int:
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}\x00{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def draw(logits: torch.Tensor, generators: list[torch.Generator], temperature: float, top_p: float) -> torch.Tensor:
    """One next token per row, each from its own generator."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # tokens after the nucleus; the top token always stays
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    # Inverse CDF with one uniform per row from that row's generator (30x faster than torch.multinomial per row).
    cdf = probs.double().cumsum(-1)
    u = torch.cat([torch.rand(1, generator=g, device=g.device, dtype=torch.float64) for g in generators])
    return torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


@dataclasses.dataclass
class SamplingSettings:
    """What every backend samples with."""

    num_responses: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    batch_size: int  # sequences decoded together
    stop_ids: set[int]
    pad_id: int
    device: torch.device

    def seeds(self, prompt_id: str) -> list[int]:
        """The seed of each of a prompt's K responses."""
        return [row_seed(self.seed, prompt_id, k) for k in range(self.num_responses)]

    def generators(self, rows: Sequence[dict]) -> list[list[torch.Generator]]:
        return [[torch.Generator(self.device).manual_seed(seed) for seed in self.seeds(row["prompt_id"])] for row in rows]

    @property
    def prompts_per_batch(self) -> int:
        return max(1, self.batch_size // self.num_responses)


Item = tuple[list[int], dict]  # (prompt token ids, prompt row)
Response = tuple[list[int], bool]  # (token ids without the stop token, finished)
Samples = Iterator[list[tuple[dict, list[Response]]]]  # groups of (prompt row, its K responses), as prompts complete
