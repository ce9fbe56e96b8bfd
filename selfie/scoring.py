"""Summed log-probs of tokenised responses after their prompts: the one log-prob path of the implicit-reward judge
(selfie/labelling/implicit_reward.py), the `implicit:` judge of `selfie eval` and the edits' preference margins
(selfie/edit/preference.py).

A prompt and its K responses go through the model as ONE row, the responses side by side after the shared prompt
with an attention mask that lets each response see only the prompt and itself (and position ids that restart after
the prompt), so the prompt is computed once instead of K times. Only attention implementations that apply such a
4-D mask as given (eager, sdpa) see packed rows; under any other (flash-attention, flex attention, a hub kernel)
each response gets a row of its own after its prompt, with a plain padding mask. Rows are sorted by length and
batched by a token budget; the vocabulary projection runs only at the positions that predict response tokens
(selfie/projection.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from selfie.models import unwrap_peft
from selfie.projection import logit_softcap, output_layer, token_logps

logger = logging.getLogger(__name__)

# transformers' attention implementations that apply a 4-D additive mask exactly as given (tests/test_scoring.py)
PACKING_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass
class PromptResponses:
    """One prompt and its K responses as token ids, laid out as one row: [prompt | response_1 | ... | response_K]."""

    prompt: list[int]
    responses: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompt) + sum(len(r) for r in self.responses)


def token_budget_batches(items: Sequence[PromptResponses], token_budget: int) -> list[list[int]]:
    """Indices of `items`, longest first; a batch holds rows while rows x longest row <= budget (an over-long row
    goes alone)."""
    batches: list[list[int]] = []
    for i in sorted(range(len(items)), key=lambda i: len(items[i]), reverse=True):
        if batches and (len(batches[-1]) + 1) * len(items[batches[-1][0]]) <= token_budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def takes_packed_rows(model: torch.nn.Module) -> bool:
    """Whether the model's attention implementation applies the packed rows' 4-D mask as given."""
    implementation = unwrap_peft(model).config._attn_implementation
    if implementation in PACKING_IMPLEMENTATIONS:
        return True
    _say_unpacked(implementation)
    return False


@functools.cache
def _say_unpacked(implementation: str) -> None:
    logger.info(
        "attention implementation %s does not take a packed row's 4-D mask: each response is scored on a row of its "
        "own (its prompt computed once per response)",
        implementation,
    )


def unpacked(items: Sequence[PromptResponses]) -> list[PromptResponses]:
    """Every response on a row of its own after its prompt (item by item, response by response)."""
    return [PromptResponses(item.prompt, [response]) for item in items for response in item.responses]


def pack(batch: Sequence[PromptResponses], pad_id: int, dtype: torch.dtype, device: torch.device, packed: bool = True) -> dict:
    """Input ids, position ids and 4-D additive attention mask of the packed rows, plus where each scored token is.
    Rows of one response each (`packed` false) get a plain [rows, width] padding mask instead: every attention
    implementation takes that.

    `source` is the position whose hidden state predicts a response token: the previous position,
    or the prompt's last position for a response's first token. `sequence` numbers the responses
    of the batch in order (row by row).
    """
    width = max(len(t) for t in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(batch), width), dtype=torch.long)
    segment = torch.full((len(batch), width), -1, dtype=torch.long)  # 0 = prompt, k = response k, -1 = padding
    rows, sources, targets, sequence = [], [], [], []
    n_seq = 0
    for b, item in enumerate(batch):
        p = len(item.prompt)
        ids[b, :p] = torch.tensor(item.prompt)
        positions[b, :p] = torch.arange(p)
        segment[b, :p] = 0
        start = p
        for k, resp in enumerate(item.responses, 1):
            r = len(resp)
            if r:
                ids[b, start : start + r] = torch.tensor(resp)
                positions[b, start : start + r] = torch.arange(p, p + r)
                segment[b, start : start + r] = k
                rows += [b] * r
                sources += [p - 1] + list(range(start, start + r - 1))
                targets += resp
                sequence += [n_seq] * r
            start += r
            n_seq += 1
    if packed:
        # Each position attends to earlier positions of the prompt or of its own segment (padding to the
        # prompt and earlier padding: never an empty row, and no real token comes after padding).
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        allowed = causal & ((segment.unsqueeze(2) == segment.unsqueeze(1)) | (segment.unsqueeze(1) == 0))
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)
    else:
        if any(len(item.responses) > 1 for item in batch):
            raise ValueError("rows without the packed mask hold one response each")
        mask = (segment >= 0).long()  # right padding
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return {
        "input_ids": ids.to(device),
        "position_ids": positions.to(device),
        "attention_mask": mask.to(device),
        "rows": as_tensor(rows),
        "sources": as_tensor(sources),
        "targets": as_tensor(targets),
        "sequence": as_tensor(sequence),
        "num_sequences": n_seq,
    }


def packed_logps(model: PreTrainedModel, packed: dict) -> torch.Tensor:
    """Summed log-prob of every response in the packed batch (float64, on CPU)."""
    hidden = model.get_decoder()(
        input_ids=packed["input_ids"],
        position_ids=packed["position_ids"],
        attention_mask=packed["attention_mask"],
        use_cache=False,
    ).last_hidden_state
    states = hidden[packed["rows"], packed["sources"]]
    head = output_layer(model)
    logps = token_logps([(1.0, states)], packed["targets"], head.weight, head.bias, logit_softcap(model))
    sums = torch.zeros(packed["num_sequences"], dtype=torch.float64, device=states.device)
    sums.index_add_(0, packed["sequence"], logps.double())
    return sums.cpu()


@dataclass
class SequenceLogps:
    """`logps[v][i][k]`: the summed log-prob of item i's response k under view v; the positions run, without and with
    padding."""

    logps: list[list[list[float]]]
    tokens: int
    padded_tokens: int


@torch.inference_mode()
def sequence_logps(
    model: torch.nn.Module,
    items: Sequence[PromptResponses],
    pad_id: int,
    token_budget: int,
    views: Sequence[Callable[[], AbstractContextManager]] = (contextlib.nullcontext,),
    progress: str | None = None,
) -> SequenceLogps:
    """Summed log-prob of every response of every item, once per view of the model: each view is entered around its
    pass over a packed batch (a PEFT model's `disable_adapter` makes the reference view; the default is the model as
    it is). `progress` names a progress bar (none without it)."""
    inner = unwrap_peft(model)  # the decoder and output layer; a PEFT model's LoRA layers stay active in it
    param = next(inner.parameters())
    packed = takes_packed_rows(inner)
    rows = items if packed else unpacked(items)
    sums_of: list[list[list[float]]] = [[[] for _ in rows] for _ in views]
    tokens = padded = 0
    with tqdm(total=len(rows), desc=progress, unit="row", disable=None if progress else True) as bar:
        for batch in token_budget_batches(rows, token_budget):
            inputs = pack([rows[i] for i in batch], pad_id, param.dtype, param.device, packed)
            for v, view in enumerate(views):
                with view():
                    sums = packed_logps(inner, inputs).tolist()
                n = 0
                for i in batch:
                    k = len(rows[i].responses)
                    sums_of[v][i], n = sums[n : n + k], n + k
            tokens += sum(len(rows[i]) for i in batch)
            padded += inputs["input_ids"].numel()
            bar.update(len(batch))
    logps = sums_of if packed else [_regrouped(view, items) for view in sums_of]
    return SequenceLogps(logps, tokens, padded)


def _regrouped(sums: list[list[float]], items: Sequence[PromptResponses]) -> list[list[float]]:
    """Per-row sums of `unpacked(items)` back as each item's list of K sums."""
    flat = iter(s for row in sums for s in row)
    return [[next(flat) for _ in item.responses] for item in items]
