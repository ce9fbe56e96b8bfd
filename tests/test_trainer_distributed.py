"""NoiseAwareDPOTrainer under `accelerate launch`: two processes, kill and resume (also under ZeRO-3); the whole loop
under ZeRO-2 and ZeRO-3 is tests/test_launches.py.

Each test launches tests/train_stage.py in fresh processes, as a user's `accelerate launch` would.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from launcher import accelerate_launch
from safetensors.torch import load_file

from selfie.io import atomic_write_jsonl, read_jsonl

from tiny import toy_pairs

ROOT = Path(__file__).parent.parent
CONFIGS = ROOT / "accelerate_configs"
STAGE = [
    "--train.learning_rate",
    "3e-3",
    "--train.max_length",
    "128",
    "--train.save_steps",
    "2",
    "--lora.r",
    "4",
    "--lora.alpha",
    "8",
    "--lora.dropout",
    "0.0",
    "--refine.quantile",
    "0.25",
    "--refine.window_steps",
    "2",
    "--refine.warmup_fraction",
    "0.2",
]


def launch(config: str, *args: str, processes: int = 1, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = accelerate_launch(
        CONFIGS / config, "--num_processes", str(processes), *extra, str(ROOT / "tests" / "train_stage.py"), *args
    )
    env = os.environ | {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    atomic_write_jsonl(path, toy_pairs(16))
    return path


def adapter(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path, atol: float) -> None:
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=atol, msg=key)


def iteration_args(tiny_model: str, pairs: Path, out: Path, prev_adapter: Path, *more: str) -> list[str]:
    return [tiny_model, str(pairs), str(out), "--iteration", "1", "--prev_adapter", str(prev_adapter), *STAGE, *more]


def test_two_processes_share_tau_and_match_one_process(tiny_model, pairs, prev_adapter, tmp_path):
    """2 ranks x 2 pairs against 1 rank x 4 pairs: the same global batches, so the same training."""
    single, double = tmp_path / "single", tmp_path / "double"
    check(
        launch(
            "cpu.yaml",
            *iteration_args(
                tiny_model,
                pairs,
                single,
                prev_adapter,
                "--max_steps",
                "8",
                "--train.per_device_train_batch_size",
                "4",
                "--trace",
                str(tmp_path / "t1"),
            ),
        )
    )
    check(
        launch(
            "multi_gpu.yaml",
            *iteration_args(
                tiny_model,
                pairs,
                double,
                prev_adapter,
                "--max_steps",
                "8",
                "--train.per_device_train_batch_size",
                "2",
                "--trace",
                str(tmp_path / "t2"),
            ),
            processes=2,
        )
    )
    rank0, rank1 = read_jsonl(tmp_path / "t2.rank0"), read_jsonl(tmp_path / "t2.rank1")
    assert len(rank0) == 8 and rank0 == rank1  # every rank logs the same tau and smoothed fraction at every step
    assert any(row["refine/smoothed_fraction"] > 0 for row in rank0)  # refinement really acted after the warm-up
    for one, two in zip(read_jsonl(tmp_path / "t1.rank0"), rank0):
        assert one["step"] == two["step"]
        for key in ("refine/tau", "refine/margin_mean", "refine/smoothed_fraction"):
            assert one[key] == pytest.approx(two[key], rel=1e-4, abs=1e-5), (one["step"], key)
    assert_same_adapter(single, double, atol=1e-5)


@pytest.mark.parametrize("config, processes", [("cpu.yaml", 1), ("deepspeed_zero3.yaml", 2)])
def test_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(
    config, processes, tiny_model, pairs, prev_adapter, tmp_path
):
    """Under ZeRO-3 the checkpoint holds DeepSpeed's own shards (zero3_save_16bit_model: false gathers no model)."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = ("--max_steps", "6", "--train.per_device_train_batch_size", str(4 // processes))
    check(launch(config, *iteration_args(tiny_model, pairs, whole, prev_adapter, *args), processes=processes))
    killed = launch(
        config,
        *iteration_args(tiny_model, pairs, resumed, prev_adapter, *args, "--kill_after_checkpoint", "4"),
        processes=processes,
    )
    assert killed.returncode != 0 and not (resumed / "adapter").exists()
    assert (resumed / "checkpoints" / "checkpoint-4" / "refine_state.json").is_file()
    check(launch(config, *iteration_args(tiny_model, pairs, resumed, prev_adapter, *args), processes=processes))
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-4") and metrics["steps"] == 6 and metrics["processes"] == processes
    assert metrics["refine/smoothed_fraction"] == json.loads((whole / "metrics.json").read_text())["refine/smoothed_fraction"]
    assert_same_adapter(whole, resumed, atol=0)


def test_fsdp_on_cpu_is_refused_rather_than_run_as_ddp(tiny_model, pairs, prev_adapter, tmp_path):
    result = launch(
        "fsdp.yaml", *iteration_args(tiny_model, pairs, tmp_path / "out", prev_adapter, "--max_steps", "1"), processes=2
    )
    assert result.returncode != 0 and "accelerate runs FSDP on GPUs only" in result.stderr
    assert not (tmp_path / "out").exists()
