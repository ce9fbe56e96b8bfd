"""The process layout under `accelerate launch`, on GPUs and on CPU-only machines alike.

accelerate recognises several CPU processes (MULTI_CPU over gloo) only when told `cpu=True`; without it
each rank believes it runs alone (no gradient all-reduce, no sharding). Everything in selfie asks here.
"""

from __future__ import annotations

import os

import torch
from accelerate import PartialState


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def uses_deepspeed() -> bool:
    """`accelerate launch` with a DeepSpeed config sets this for every rank."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def process_state() -> PartialState:
    return PartialState(cpu=on_cpu())
