"""`accelerate launch` as the tests start it."""

from __future__ import annotations

import sys
from pathlib import Path


def accelerate_launch(config: Path, *args: str) -> list[str]:
    """`accelerate launch --config_file CONFIG ARGS` on a port accelerate picks free (0), so that launches from the
    two test workers `make test` runs side by side never meet on accelerate's default port 29500."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port", "0", *args]
