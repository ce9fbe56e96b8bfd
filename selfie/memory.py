"""What a stage leaves in memory: its peak resident set (and GPU memory), and the release of what it loaded before the
next stage loads its own (a vLLM engine sizes its cache from the GPU memory it finds free)."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

_PROC = Path("/proc/self")


def reset_peaks() -> None:
    """Start a new peak: the resident set's high-water mark (Linux) and the GPU allocator's."""
    try:
        (_PROC / "clear_refs").write_text("5")  # resets VmHWM to the current resident set
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peaks() -> dict[str, float]:
    """MiB at the peak since `reset_peaks`: resident set (where /proc tells it) and GPU memory allocated."""
    measured = {}
    try:
        status = (_PROC / "status").read_text()
        measured["peak_rss_mib"] = round(int(status.split("VmHWM:")[1].split()[0]) / 1024, 1)
    except (OSError, IndexError, ValueError):
        pass
    if torch.cuda.is_available():
        measured["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return measured


def release() -> None:
    """Free what the finished stage no longer references (cycles included) and hand cached GPU blocks back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
