"""The environment of the benchmark tools users report with (lm-eval, AlpacaEval): `make eval-env` builds it in
selfie's cache as a venv over this Python's packages (docs/REPORTING.md). Tests only: selfie itself never runs them."""

from __future__ import annotations

import os
from pathlib import Path

from selfie.models import cache_dir

PYTHON_ENV = "SELFIE_EVAL_PYTHON"


def interpreter() -> str:
    """$SELFIE_EVAL_PYTHON, else the python `make eval-env` builds; a RuntimeError saying how to get one when there is none."""
    configured = os.environ.get(PYTHON_ENV)
    if configured:
        if not Path(configured).is_file():
            raise RuntimeError(f"{PYTHON_ENV}={configured} is not a file")
        return configured
    built = cache_dir() / "eval-env" / "bin" / "python"
    if not built.is_file():
        raise RuntimeError(f"no lm-eval / AlpacaEval environment: `make eval-env` builds one in {built.parent.parent}")
    return str(built)
