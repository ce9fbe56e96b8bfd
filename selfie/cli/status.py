"""`selfie status RUN`: where a run directory stands."""

from __future__ import annotations

import argparse
from pathlib import Path

from selfie.run.status import DEFAULT_ROOT, runs_overview, status_text


def add_status_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="?", help="a run directory (without one: the runs under ./runs)")


def run_status_command(args: argparse.Namespace) -> None:
    print(status_text(args.run_dir) if args.run_dir else runs_overview(Path(DEFAULT_ROOT)))
