import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Directory of a tiny random Llama with a chat-template tokenizer."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory) -> str:
    """A second tiny model of another shape, for adapter-mismatch checks."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny2") / "model", hidden_size=48, seed=1))
