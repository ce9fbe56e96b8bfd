import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from selfie.config.schema import LoraConfig  # noqa: E402
from selfie.models import attach_lora, load_model, save_adapter  # noqa: E402

from tiny import build_tiny_model, perturb_adapter  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Directory of a tiny random Llama with a chat-template tokenizer."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory) -> str:
    """A second tiny model of another shape, for adapter-mismatch checks."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny2") / "model", hidden_size=48, seed=1))


@pytest.fixture(scope="session")
def prev_adapter(tiny_model, tmp_path_factory) -> Path:
    """A non-trivial adapter playing pi_{t-1} (lora_B is not zero, so pi_{t-1} != pi_init)."""
    torch.manual_seed(0)
    model = attach_lora(load_model(tiny_model), LoraConfig(r=4, alpha=8, dropout=0.0))
    perturb_adapter(model, seed=1)
    path = tmp_path_factory.mktemp("prev") / "adapter"
    save_adapter(model, path)
    return path


@pytest.fixture(scope="session")
def eval_python() -> str:
    """The python of lm-eval's and AlpacaEval's environment (tests/eval_env.py)."""
    from eval_env import interpreter

    try:
        return interpreter()
    except RuntimeError as e:
        if os.environ.get("CI"):  # `make test` builds the environment: in CI these tests must run
            pytest.fail(str(e))
        pytest.skip(str(e))
