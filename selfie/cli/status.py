"""`selfie status RUN`: where a run directory stands."""

from __future__ import annotations

import argparse

from selfie.run.status import status_text


def add_status_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")


def run_status_command(args: argparse.Namespace) -> None:
    print(status_text(args.run_dir))
