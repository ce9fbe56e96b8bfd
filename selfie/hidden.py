"""Hidden states of (prompt, response) texts at every decoder layer, batched.

Two edit points per layer: "layer" is the decoder layer's output (the residual stream after the
layer) and "mlp" is the output of its MLP block (what `mlp.down_proj` writes). Both are read with
forward hooks rather than `output_hidden_states`, because HF's last `hidden_states` entry is taken
after the final norm and would not be the last layer's output. Position ids are passed explicitly
so that left and right padding give the same states as an unpadded forward.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfie.errors import SelfieError
from selfie.models import unwrap_peft
from selfie.tokens import chat_ids

logger = logging.getLogger(__name__)

LOCATIONS = ("layer", "mlp")
MODES = ("last", "mean", "tokens")


class Encoded(NamedTuple):
    """Token ids of prompt + response; the response starts at `prompt_len`."""

    ids: list[int]
    prompt_len: int


def encode(tokenizer: PreTrainedTokenizerBase, prompt: list[dict], response: str) -> Encoded:
    """The prompt through the chat template (with the generation prompt), then the response tokens as generated.

    No end-of-turn token is appended: the last position is the response's last token, the one
    AlignEZ reads, and the same response tokens follow any prompt (RAHF compares them position by position).
    """
    prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)
    return Encoded(prompt_ids + tokenizer(response, add_special_tokens=False)["input_ids"], len(prompt_ids))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = unwrap_peft(model)
    layers = getattr(base.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise SelfieError(f"{type(base).__name__}: cannot find its decoder layers (expected model.get_decoder().layers)")
    return layers


def edit_point(model: nn.Module, layer: int, location: str) -> nn.Module:
    if location not in LOCATIONS:
        raise SelfieError(f"location '{location}': expected one of {', '.join(LOCATIONS)}")
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise SelfieError(f"layer {layer}: the model has layers 0..{len(layers) - 1}")
    module = layers[layer]
    if location == "mlp":
        module = getattr(module, "mlp", None)
        if module is None:
            raise SelfieError(f"layer {layer} of {type(model).__name__} has no `mlp` module")
    return module


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    offsets: list[int]  # column of each row's first real token

    def response_index(self, items: Sequence[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of every response token of the batch, row by row."""
        rows, cols = [], []
        for b, (item, offset) in enumerate(zip(items, self.offsets)):
            n = len(item.ids) - item.prompt_len
            rows.append(torch.full((n,), b, dtype=torch.long))
            cols.append(torch.arange(offset + item.prompt_len, offset + len(item.ids)))
        device = self.input_ids.device
        return torch.cat(rows).to(device), torch.cat(cols).to(device)

    def last_index(self, items: Sequence[Encoded]) -> torch.Tensor:
        return torch.tensor(
            [offset + len(item.ids) - 1 for item, offset in zip(items, self.offsets)], device=self.input_ids.device
        )


def pad_batch(items: Sequence[Encoded], pad_id: int, side: str = "left", device: torch.device | str | None = None) -> Batch:
    width = max(len(item.ids) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    positions = torch.zeros((len(items), width), dtype=torch.long)
    offsets = []
    for b, item in enumerate(items):
        n = len(item.ids)
        start = width - n if side == "left" else 0
        ids[b, start : start + n] = torch.tensor(item.ids)
        mask[b, start : start + n] = 1
        positions[b, start : start + n] = torch.arange(n)
        offsets.append(start)
    return Batch(ids.to(device), mask.to(device), positions.to(device), offsets)


class _StopForward(Exception):
    """Raised by the last capture hook: layers after it are not needed."""


@contextmanager
def capture(
    model: nn.Module, layers: Sequence[int], location: str = "layer", stop: bool = False
) -> Iterator[dict[int, torch.Tensor]]:
    """Record the output of each layer's edit point during a forward (with its graph when grad is on).

    With `stop`, the forward is cut after the last requested layer (use `run_to_layers`).
    """
    store: dict[int, torch.Tensor] = {}
    last = max(layers)

    def hook_for(layer: int):
        def hook(module: nn.Module, args: tuple, output):
            store[layer] = output[0] if isinstance(output, tuple) else output
            if stop and layer == last:
                raise _StopForward

        return hook

    handles = [edit_point(model, layer, location).register_forward_hook(hook_for(layer)) for layer in layers]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def run_to_layers(model: nn.Module, batch: Batch, layers: Sequence[int], location: str = "layer") -> dict[int, torch.Tensor]:
    """Forward `batch` only as far as the last of `layers`; return {layer: [batch, width, hidden]}."""
    with capture(model, layers, location, stop=True) as store:
        try:
            model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
            )
        except _StopForward:
            pass
    return store


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def collect_states(
    model: PreTrainedModel,
    items: Sequence[Encoded],
    pad_id: int,
    *,
    layers: Sequence[int] | None = None,
    location: str = "layer",
    mode: str = "last",
    batch_size: int = 8,
    padding_side: str = "left",
    desc: str = "states",
) -> torch.Tensor | list[torch.Tensor]:
    """States of `items` at `layers` (default: all), float32 on the CPU.

    mode "last": [N, L, H] at each sequence's last token; "mean": [N, L, H] averaged over the
    response tokens; "tokens": a list of [L, T_i, H] over the response tokens of each item.
    """
    if mode not in MODES:
        raise SelfieError(f"mode '{mode}': expected one of {', '.join(MODES)}")
    if mode != "last" and any(len(item.ids) == item.prompt_len for item in items):
        raise SelfieError(f"mode '{mode}' needs response tokens, and a response is empty")
    layers = list(range(len(decoder_layers(model)))) if layers is None else list(layers)
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))  # similar lengths share a batch: less padding
    results: list = [None] * len(items)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=None):
        idx = order[start : start + batch_size]
        chunk = [items[i] for i in idx]
        batch = pad_batch(chunk, pad_id, padding_side, _device(model))
        store = run_to_layers(model, batch, layers, location)
        states = torch.stack([store[layer] for layer in layers], dim=1).float()  # [B, L, W, H]
        if mode == "last":
            picked = states[torch.arange(len(chunk)), :, batch.last_index(chunk)]
            for i, row in zip(idx, picked.cpu()):
                results[i] = row
            continue
        for b, (i, item) in enumerate(zip(idx, chunk)):
            begin = batch.offsets[b] + item.prompt_len
            tokens = states[b, :, begin : batch.offsets[b] + len(item.ids)].cpu()
            results[i] = tokens.mean(dim=1) if mode == "mean" else tokens
    return torch.stack(results) if mode != "tokens" else results
