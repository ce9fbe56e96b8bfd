"""The process layout under `accelerate launch`, on GPUs and on CPU-only machines alike, and the loop's
collective steps: work on rank 0 shared with every rank, and row files sharded over the ranks and merged.

accelerate recognises several CPU processes (MULTI_CPU over gloo) only when told `cpu=True`; without it
each rank believes it runs alone (no gradient all-reduce, no sharding). Everything in selfie asks here.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

from selfie.errors import SelfieError, os_error_line
from selfie.io import atomic_write_jsonl, read_jsonl

T = TypeVar("T")


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def uses_deepspeed() -> bool:
    """`accelerate launch` with a DeepSpeed config sets this for every rank."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def world_size() -> int:
    """The number of processes `accelerate launch` started (1 without it); known before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank among them (0 without a launcher), likewise."""
    return int(os.environ.get("RANK", "0"))


def zero_stage() -> int | None:
    """The DeepSpeed ZeRO stage this `accelerate launch` runs (None: no DeepSpeed)."""
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")) if uses_deepspeed() else None


def process_state(timeout_seconds: float | None = None) -> PartialState:
    """This process's place among the launched ranks; the first call sets up the process group, whose collectives wait
    `timeout_seconds` for a slow rank (torch's default, 30 minutes, when None)."""
    timeout = {"timeout": timedelta(seconds=timeout_seconds)} if timeout_seconds else {}
    return PartialState(cpu=on_cpu(), **timeout)


def check_topology() -> None:
    """Refuse an accelerate config that asks for FSDP on a machine where accelerate would silently run DDP."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and on_cpu():
        raise SelfieError(
            "the accelerate config asks for FSDP, but accelerate runs FSDP on GPUs only (on CPU it falls "
            "back to plain data parallelism); here use accelerate_configs/multi_gpu.yaml or deepspeed_zero*.yaml"
        )


@contextlib.contextmanager
def trainer_scope() -> Iterator[None]:
    """The lifetime of one trainer: what DeepSpeed leaves process-wide goes with it.

    Building TrainingArguments under a DeepSpeed launch sets transformers' process-wide DeepSpeed config: left set,
    every later `from_pretrained` in the process would run under ZeRO-3's zero.Init and give each rank empty shards.
    It is taken down when the trainer is done (unless something outside set it first), with ZeRO-3's references to
    the engine's modules (`_release_zero3_references`).
    """
    from transformers.integrations import deepspeed_config, unset_hf_deepspeed_config

    outside = deepspeed_config() is not None
    try:
        yield
    finally:
        if not outside:
            unset_hf_deepspeed_config()
            _release_zero3_references()


def _release_zero3_references() -> None:
    """ZeRO-3 keeps its engine's modules reachable for good: the top module in a module-level stack
    (parameter_offload.FWD_MODULE_STACK) and every submodule in functools caches keyed by module (the parameter
    coordinator's release lists), so a finished stage's model and its parameter shards would stay in memory. Once the
    trainer is done none of it runs again: the stack is emptied and DeepSpeed's caches cleared."""
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    if offload is None:  # DeepSpeed never ran in this process
        return
    offload.FWD_MODULE_STACK.clear()
    for cache in gc.get_objects():
        if isinstance(cache, functools._lru_cache_wrapper) and getattr(cache, "__module__", "").startswith("deepspeed."):
            cache.cache_clear()


@dataclass
class Ranks:
    """This process among the `accelerate launch` ranks, and the collective steps the stages take."""

    state: PartialState

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    @property
    def device(self) -> torch.device:
        return self.state.device

    def barrier(self) -> None:
        self.state.wait_for_everyone()

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run fn on rank 0 only; every rank gets its result, or raises its error (no rank left waiting)."""
        box = outcome(fn) if self.is_main else [None, None]
        if self.state.num_processes > 1:
            broadcast_object_list(box)
        return result_of(box)

    def sharded(self, final: Path, work: Callable[[Path, tuple[int, int]], dict]) -> dict:
        """Run `work(out, (rank, world))` on this rank's shard; rank 0 merges the shard files (sorted by prompt_id)
        into `final`. Returns the ranks' metrics combined; a rank's error is every rank's (no rank left waiting)."""
        world, rank = self.state.num_processes, self.state.process_index
        if world == 1:
            return work(final, (0, 1))
        boxes = gather_object([outcome(lambda: work(shard_path(final, rank, world), (rank, world)))])
        metrics = [result_of(box) for box in boxes]
        if self.is_main:
            merge_shards(final, world)
        self.barrier()
        return combine_metrics(metrics)


def outcome(fn: Callable[[], T]) -> list[Any]:
    """[fn's result, None], or [None, its error line] for an error that is the user's to fix (to hand to other ranks)."""
    try:
        return [fn(), None]
    except SelfieError as e:
        return [None, str(e)]
    except OSError as e:
        return [None, os_error_line(e)]


def result_of(box: list[Any]) -> Any:
    if box[1] is not None:
        raise SelfieError(box[1])
    return box[0]


def shard_path(final: Path, rank: int, world: int) -> Path:
    """Where rank `rank` of `world` writes its part of `final`."""
    return final.with_name(f"{final.stem}.rank{rank}-of-{world}{final.suffix}")


def merge_shards(final: Path, world: int) -> None:
    """Rank 0: the ranks' parts of `final` as one file (rows sorted by prompt_id), the parts removed."""
    shards = [shard_path(final, rank, world) for rank in range(world)]
    atomic_write_jsonl(final, sorted((row for path in shards for row in read_jsonl(path)), key=lambda row: row["prompt_id"]))
    for path in shards:
        path.unlink()


def combine_metrics(shards: list[dict]) -> dict:
    """Merge per-rank stage metrics: counts add up, wall time is the slowest rank's, rates are recomputed."""
    if len(shards) == 1:
        return shards[0]
    merged: dict[str, Any] = {}
    for shard in shards:
        for key, value in shard.items():
            if isinstance(value, dict):
                merged[key] = combine_metrics([merged.get(key, {}), value]) if key in merged else dict(value)
            elif key == "seconds":
                merged[key] = max(merged.get(key, 0.0), value)
            elif isinstance(value, (int, float)) and not key.endswith(("per_second", "fraction", "mean")):
                merged[key] = merged.get(key, 0) + value
            elif isinstance(value, str):  # e.g. the generation backend each rank used
                merged[key] = value if merged.get(key, value) == value else "mixed"
    seconds = merged.get("seconds") or 0.0
    for rate, count in (("tokens_per_second", "new_tokens"), ("pairs_per_second", "pairs")):
        if count in merged and seconds:
            merged[rate] = merged[count] / seconds
    return merged
