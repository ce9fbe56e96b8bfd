"""The process layout under `accelerate launch`, on GPUs and on CPU-only machines alike.

accelerate recognises several CPU processes (MULTI_CPU over gloo) only when told `cpu=True`; without it
each rank believes it runs alone (no gradient all-reduce, no sharding). Everything in selfie asks here.
"""

from __future__ import annotations

import os

import torch
from accelerate import PartialState

from selfie.errors import SelfieError


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def uses_deepspeed() -> bool:
    """`accelerate launch` with a DeepSpeed config sets this for every rank."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def process_state() -> PartialState:
    return PartialState(cpu=on_cpu())


def check_topology() -> None:
    """Refuse an accelerate config that asks for FSDP on a machine where accelerate would silently run DDP."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and on_cpu():
        raise SelfieError("the accelerate config asks for FSDP, but accelerate runs FSDP on GPUs only (on CPU it falls "
                          "back to plain data parallelism); here use accelerate_configs/multi_gpu.yaml or deepspeed_zero*.yaml")
