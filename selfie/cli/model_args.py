"""The flags of a command that runs a policy (pi_init + adapter, `selfie.models.load_policy`) over a file."""

from __future__ import annotations

import argparse

from selfie.cli.flags import add_options
from selfie.config.schema import ModelConfig


def add_policy_args(
    parser: argparse.ArgumentParser, *, model: str, adapter: str, adapter_required: bool, reads: tuple[str, str], writes: str
) -> None:
    """`--model`, `--adapter`, `--dtype` (model.dtype's default), the file it reads (flag, help) and `--output`."""
    parser.add_argument("--model", required=True, help=model)
    parser.add_argument("--adapter", required=adapter_required, default=None, help=adapter)
    parser.add_argument(reads[0], required=True, help=reads[1])
    parser.add_argument("--output", required=True, help=writes)
    add_options(parser, ModelConfig, ["dtype"], {"dtype": "auto, float32, bfloat16 or float16"})
