"""Train one stage's adapter from a pairs file: what the distributed trainer tests launch.

    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml tests/train_stage.py \
        MODEL PAIRS.jsonl OUTPUT_DIR [--prev_adapter DIR --iteration T] [--max_steps N] [--trace FILE] \
        [--kill_after_checkpoint STEP] [recipe overrides: --train.per_device_train_batch_size 2 ...]

Trains into OUTPUT_DIR/adapter; resumes from OUTPUT_DIR/checkpoints when a complete checkpoint is there.
With --trace, every rank appends its logged refine/* values per step to FILE.rank<i> (JSON Lines), so a test
can check that all ranks agree. With --kill_after_checkpoint the process SIGKILLs itself once that step's
checkpoint is completely written.
The stage metrics are written to OUTPUT_DIR/metrics.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

from selfie.config.loader import load_recipe
from selfie.dist import process_state
from selfie.io import atomic_write_json, read_jsonl
from selfie.training.stage import TrainOutputs, train_adapter


class TraceRefine(TrainerCallback):
    """Appends each logged step's refine/* values (as this rank computed them) to a per-rank file."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = {k: v for k, v in (logs or {}).items() if k.startswith("refine/")}
        if values:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **values}) + "\n")


class KillAfterCheckpoint(TrainerCallback):
    """A real SIGKILL right after checkpoint-`step` is saved (on_save runs once the checkpoint is complete)."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("pairs")
    parser.add_argument("output_dir")
    parser.add_argument("--prev_adapter")
    parser.add_argument("--iteration", type=int, default=0)
    parser.add_argument("--max_steps", type=int, default=-1)
    parser.add_argument("--trace")
    parser.add_argument("--kill_after_checkpoint", type=int)
    args, overrides = parser.parse_known_args(argv)
    config = load_recipe(None, ["--report_to", "[]", *overrides])
    rank = process_state().process_index
    callbacks = [TraceRefine(Path(f"{args.trace}.rank{rank}"))] if args.trace else []
    if args.kill_after_checkpoint:
        callbacks.append(KillAfterCheckpoint(args.kill_after_checkpoint))
    output_dir = Path(args.output_dir)
    metrics = train_adapter(
        args.model,
        read_jsonl(args.pairs),
        TrainOutputs(output_dir / "adapter", output_dir / "checkpoints"),
        config,
        iteration=args.iteration,
        prev_adapter=args.prev_adapter,
        callbacks=callbacks,
        max_steps=args.max_steps,
    )
    if rank == 0:
        atomic_write_json(output_dir / "metrics.json", metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
