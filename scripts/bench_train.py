"""DPO step time and peak memory: selfie's LoRA iteration against TRL's stock full fine-tuning, each in a fresh process.

1. selfie: `train_iteration` (iteration 1 of the demo recipe): one model copy, a LoRA adapter
   continued from the previous iteration's; the reference pi_{t-1} is TRL's frozen "ref" copy of
   that adapter on the same base weights; label refinement and DND (lambda_1) on.
2. TRL: stock `trl.DPOTrainer`, full fine-tuning of the model with a separate `ref_model` (a
   second full copy), the same TRL arguments (the demo recipe's, through selfie's build_dpo_config).

Both: smollm2-135m in float32, the first --pairs pairs of the built-in demo-seed set, the same batch
size and max_length, no gradient checkpointing (the recipe's setting; stock TRL would default to
it). The first optimizer step is a warm-up; the next --steps are timed from the step's start to
after the optimizer update. The previous iteration's adapter is a random one, made once in --workdir.

    python scripts/bench_train.py [--quick] [--pairs 8] [--batch-size 4] [--steps 3] [--max-length 256]

Writes the "Training" section of docs/BENCHMARKS.md and docs/bench/train.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import tempfile
import time
from pathlib import Path

from benchlib import import_floor, isolated, machine, matmul_gflops, parse_args, random_lora, save_raw, write_section

MODEL = "smollm2-135m"
RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "smollm2-135m" / "spa" / "demo.yaml"
ITERATION = 1
FLOPS_PER_PARAM_TOKEN = 6 + 2  # policy forward + backward, reference forward
QUICK = {"pairs": 2, "batch_size": 2, "steps": 1, "max_length": 64}


def prepare(workdir: str) -> None:
    """The previous iteration's adapter, pi_{t-1}: random (non-zero) LoRA weights, made once."""
    from selfie.models import save_adapter

    if not (Path(workdir) / "adapter" / "adapter_config.json").exists():
        save_adapter(random_lora(MODEL), Path(workdir) / "adapter")


def _recipe(batch_size: int, max_length: int):
    from selfie.config import load_recipe

    return load_recipe(RECIPE, {"model": {"dtype": "float32"}, "report_to": [],
                                "train": {"per_device_train_batch_size": batch_size, "gradient_accumulation_steps": 1,
                                          "max_length": max_length}})


def _timing_args(steps: int) -> dict:
    """TRL arguments for a timing run: warm-up + timed steps, a log per step (for its token count), no checkpoints."""
    return {"max_steps": 1 + steps, "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True}


def _pairs(n_pairs: int) -> list[dict]:
    from selfie.data import load_preferences

    return load_preferences("demo-seed")[:n_pairs]


def _step_timer():
    """A trainer callback recording the base model's parameter count, each optimizer step's seconds and, at the end,
    each step's (non-pad) tokens."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.params = 0
            self.seconds: list[float] = []
            self.tokens: list[int] = []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.params = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)

        def on_train_end(self, args, state, control, **kwargs):
            # TRL logs the running total of attention-mask tokens (both sequences of every pair) at each step
            totals = [0] + [int(h["num_tokens"]) for h in state.log_history if "loss" in h and "num_tokens" in h]
            self.tokens = [b - a for a, b in zip(totals, totals[1:])]

    return StepTimer()


def _result(timer) -> dict:
    if len(timer.tokens) != len(timer.seconds):
        raise RuntimeError(f"{len(timer.seconds)} steps timed but {len(timer.tokens)} token counts logged")
    return {"warmup_seconds": timer.seconds[0], "step_seconds": timer.seconds[1:], "step_tokens": timer.tokens[1:],
            "params": timer.params}


def run_selfie(workdir: str, n_pairs: int, batch_size: int, max_length: int, steps: int) -> dict:
    from selfie.trainer import train_iteration

    timer = _step_timer()
    with tempfile.TemporaryDirectory() as out:
        train_iteration(MODEL, Path(workdir) / "adapter", _pairs(n_pairs), out, _recipe(batch_size, max_length),
                        ITERATION, callbacks=[timer], **_timing_args(steps))  # callbacks: train_adapter's argument
    return _result(timer)


def run_trl(n_pairs: int, batch_size: int, max_length: int, steps: int) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from selfie.models import load_model, load_tokenizer
    from selfie.trainer import PAIR_COLUMNS, build_dpo_config

    recipe = _recipe(batch_size, max_length)
    timer = _step_timer()
    with tempfile.TemporaryDirectory() as out:
        ours = build_dpo_config(recipe.train, recipe.refine, out, lambda_=0.0, refine_on=False,
                                report_to=recipe.report_to, run_name=None, seed=recipe.seed, **_timing_args(steps))
        # selfie's TRL arguments, its refinement fields left out
        args = DPOConfig(**{f.name: getattr(ours, f.name) for f in dataclasses.fields(DPOConfig) if f.init})
        policy, reference = load_model(MODEL, "float32"), load_model(MODEL, "float32")
        trainer = DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=load_tokenizer(MODEL),
                             train_dataset=Dataset.from_list(_pairs(n_pairs)).select_columns(PAIR_COLUMNS),
                             callbacks=[timer])
        trainer.train()
    return _result(timer)


def _summarise(result: dict, gflops: float) -> None:
    seconds, tokens = sum(result["step_seconds"]), sum(result["step_tokens"])
    result["median_step_seconds"] = statistics.median(result["step_seconds"])
    result["tokens_per_step"] = tokens / len(result["step_tokens"])
    result["gflops_per_second"] = FLOPS_PER_PARAM_TOKEN * result["params"] * tokens / seconds / 1e9
    result["matmul_fraction"] = result["gflops_per_second"] / gflops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="first pairs of demo-seed, cycled over the steps")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps after the warm-up step")
    parser.add_argument("--max-length", type=int, default=256, help="the demo recipe's")
    parser.add_argument("--workdir", default="/tmp/selfie-bench-train")
    args = parse_args(parser, QUICK)

    started = time.perf_counter()
    isolated(prepare, args.workdir)
    gflops = matmul_gflops()
    _, floor_mib = isolated(import_floor, "transformers", "trl", "peft", "selfie.trainer")
    sizes = (args.pairs, args.batch_size, args.max_length, args.steps)
    runs = {"selfie train_iteration: LoRA r 16, reference = frozen 'ref' adapter, refinement + DND":
            (run_selfie, (args.workdir, *sizes)),
            "TRL DPOTrainer: full fine-tuning, separate ref_model": (run_trl, sizes)}
    results = {}
    for label, (fn, fn_args) in runs.items():
        result, peak = isolated(fn, *fn_args)
        result["peak_rss_mib"] = peak
        _summarise(result, gflops)
        results[label] = result
        logging.info("%s: %.1f s/step, peak %.0f MiB", label, result["median_step_seconds"], peak)
    ours, trl = results.values()
    save_raw("train", {"machine": machine(), "matmul_gflops": gflops, "floor_rss_mib": floor_mib, "args": vars(args),
                       "results": results, "wall_seconds": time.perf_counter() - started})

    above = lambda r: r["peak_rss_mib"] - floor_mib  # noqa: E731
    table = "\n".join(
        f"| {label} | {r['median_step_seconds']:.2f} | {r['tokens_per_step']:.0f} | {r['peak_rss_mib']:.0f} ({above(r):.0f}) "
        f"| {r['gflops_per_second']:.0f} ({100 * r['matmul_fraction']:.0f}%) |" for label, r in results.items())
    verdict = (f"selfie's step takes **{ours['median_step_seconds'] / trl['median_step_seconds']:.2f}x** the time of stock "
               f"TRL's, at **{ours['peak_rss_mib'] / trl['peak_rss_mib']:.2f}x** its peak RSS "
               f"(**{above(ours) / above(trl):.2f}x** above the import floor).")
    write_section("Training", f"""
`python scripts/bench_train.py{' --quick' if args.quick else ''}` ({machine()}; float32). One DPO optimizer step on
smollm2-135m: {args.batch_size} pairs per step from the first {args.pairs} pairs of the built-in demo-seed set, max_length
{args.max_length}, the demo recipe's TRL arguments (beta, learning rate, schedule; no gradient checkpointing) for both.
selfie runs iteration {ITERATION} of the demo recipe (`train_iteration`: the previous iteration's adapter continued, here a
random one). Seconds per step are the median of {args.steps} steps after a warm-up step, from the step's start to after the
optimizer update. Peak RSS is each method's own fresh process (in brackets: above the {floor_mib:.0f} MiB that importing
the libraries alone takes). GFLOP/s counts {FLOPS_PER_PARAM_TOKEN} x params x tokens per step (6 for the policy's forward
and backward, 2 for the reference forward; params = the {results[next(iter(results))]['params'] / 1e6:.0f}M base
parameters, tokens = the step's non-pad tokens); LoRA skips the base weights' gradients (about 2 of the 6), so for selfie
this is the full-fine-tuning-equivalent rate. The % is of float32 matmul throughput measured in the same run
({gflops:.0f} GFLOP/s).

| method | seconds / step | tokens / step | peak RSS MiB (above floor) | GFLOP/s (% of matmul) |
|---|---|---|---|---|
{table}

{verdict}
""")
    print(verdict)


if __name__ == "__main__":
    main()
