"""DPO step time and peak memory: selfie's LoRA iteration against TRL's DPOTrainer with a PEFT LoRA adapter, each in a
fresh process.

1. TRL: stock `trl.DPOTrainer` given a `peft_config` (the same rank, alpha and target modules as selfie's):
   plain sigmoid DPO, the reference = the same weights with the adapter disabled (no ref_model). What a TRL /
   alignment-handbook user runs.
2. selfie, refinement off: `train_iteration` (iteration 1 of the demo recipe) with refine.alpha 0 and no DND:
   one model copy, the adapter continued from the previous iteration's, the reference pi_{t-1} = TRL's frozen
   "ref" copy of that adapter on the same base weights.
3. selfie, refinement + DND: the same with the recipe's label refinement and DND (lambda_1 = 0.5): what a run does.

All: the same pairs (the first --pairs of the built-in demo-seed set), batch size, max_length and TRL arguments
(the demo recipe's, through selfie's build_dpo_config; no gradient checkpointing). One pass over the pairs is a
warm-up (`warmup_steps`); the next --steps are timed from the step's start to after the optimizer update. The previous
iteration's adapter is a random one, made once in --workdir.

    python -m scripts.benchmarks.train [--quick] [--pairs 8] [--batch-size 4] [--steps 3] [--max-length 256]
    python -m scripts.benchmarks.train --model random-llama-1b --dtype bfloat16 ... (on a GPU)

Writes the "Training" section of docs/BENCHMARKS.md (on a GPU: "Training on <device>") and docs/bench/train.json
(train-gpu.json); --render JSON rewrites the section from a saved result.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from scripts.benchlib import (
    DTYPES,
    ROOT,
    add_model_args,
    bench_model,
    import_floor,
    isolated,
    matmul_gflops,
    measure_or_load,
    model_label,
    on_gpu,
    parse_args,
    peak_memory_label,
    random_lora,
    section_title,
    write_section,
)

RECIPE = ROOT / "recipes" / "smollm2-135m" / "spa" / "demo.yaml"
ITERATION = 1
FLOPS_PER_PARAM_TOKEN = 6 + 2  # policy forward + backward, reference forward
QUICK = {"pairs": 2, "batch_size": 2, "steps": 1, "max_length": 64}
GOAL = {"time": 1.15, "memory": 1.1}  # selfie's step against TRL + LoRA's, at most


def prepare(model: str, dtype: str, workdir: str) -> None:
    """The previous iteration's adapter, pi_{t-1}: random (non-zero) LoRA weights, made once per model."""
    from selfie.models import save_adapter

    if not (Path(workdir) / "adapter" / "adapter_config.json").exists():
        save_adapter(random_lora(model, dtype=dtype), Path(workdir) / "adapter")


def _recipe(sizes: dict, refine: bool = True):
    from selfie.config.loader import load_recipe

    return load_recipe(
        RECIPE,
        {
            "model": {"dtype": sizes["dtype"]},
            "report_to": [],
            "train": {
                "per_device_train_batch_size": sizes["batch_size"],
                "gradient_accumulation_steps": 1,
                "max_length": sizes["max_length"],
            },
            **({} if refine else {"refine": {"alpha": 0.0, "lambdas": [0.0]}}),
        },
    )


def warmup_steps(sizes: dict) -> int:
    """One pass over the pairs, untimed: the timed steps then meet batch shapes already run (a GPU picks and loads
    kernels per shape on first use)."""
    return math.ceil(sizes["pairs"] / sizes["batch_size"])


def _timing_args(sizes: dict) -> dict:
    """TRL arguments for a timing run: warm-up + timed steps, a log per step (for its token count), no checkpoints."""
    return {"max_steps": warmup_steps(sizes) + sizes["steps"], "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True}


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
            if torch.cuda.is_available():  # the GPU runs behind the host: time the step's work, not its launch
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self._start)

        def on_train_end(self, args, state, control, **kwargs):
            # TRL logs the running total of attention-mask tokens (both sequences of every pair) at each step
            totals = [0] + [int(h["num_tokens"]) for h in state.log_history if "loss" in h and "num_tokens" in h]
            self.tokens = [b - a for a, b in zip(totals, totals[1:])]

    return StepTimer()


def _result(timer, warm: int) -> dict:
    if len(timer.tokens) != len(timer.seconds):
        raise RuntimeError(f"{len(timer.seconds)} steps timed but {len(timer.tokens)} token counts logged")
    return {
        "warmup_seconds": timer.seconds[:warm],
        "step_seconds": timer.seconds[warm:],
        "step_tokens": timer.tokens[warm:],
        "params": timer.params,
    }


def run_selfie(sizes: dict, refine: bool) -> dict:
    from selfie.training.stage import TrainOutputs, train_iteration

    timer = _step_timer()
    with tempfile.TemporaryDirectory() as out:
        train_iteration(
            sizes["model"],
            Path(sizes["workdir"]) / "adapter",
            _pairs(sizes["pairs"]),
            TrainOutputs(Path(out) / "adapter", Path(out) / "checkpoints"),
            _recipe(sizes, refine),
            ITERATION,
            callbacks=[timer],
            **_timing_args(sizes),
        )  # callbacks: train_adapter's argument
    return _result(timer, warmup_steps(sizes))


def run_trl_lora(sizes: dict) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from selfie.models import load_model, load_tokenizer
    from selfie.training.arguments import build_dpo_config, peft_lora_config
    from selfie.training.stage import PAIR_COLUMNS

    recipe = _recipe(sizes)
    timer = _step_timer()
    with tempfile.TemporaryDirectory() as out:
        ours = build_dpo_config(
            recipe.train,
            recipe.refine,
            out,
            lambda_=0.0,
            refine_on=False,
            report_to=recipe.report_to,
            run_name=None,
            seed=recipe.seed,
            **_timing_args(sizes),
        )
        # selfie's TRL arguments, its refinement fields left out
        args = DPOConfig(**{f.name: getattr(ours, f.name) for f in dataclasses.fields(DPOConfig) if f.init})
        trainer = DPOTrainer(
            model=load_model(sizes["model"], sizes["dtype"]),
            args=args,
            peft_config=peft_lora_config(recipe.lora),
            processing_class=load_tokenizer(sizes["model"]),
            callbacks=[timer],
            train_dataset=Dataset.from_list(_pairs(sizes["pairs"])).select_columns(PAIR_COLUMNS),
        )
        trainer.train()
    return _result(timer, warmup_steps(sizes))


def _summarise(result: dict, gflops: float) -> None:
    """The median step, its mean tokens, and the rate they make (one odd step, e.g. a shape met first, moves none)."""
    result["median_step_seconds"] = statistics.median(result["step_seconds"])
    result["tokens_per_step"] = sum(result["step_tokens"]) / len(result["step_tokens"])
    result["gflops_per_second"] = (
        FLOPS_PER_PARAM_TOKEN * result["params"] * result["tokens_per_step"] / result["median_step_seconds"] / 1e9
    )
    result["matmul_fraction"] = result["gflops_per_second"] / gflops


def measure(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    model = isolated(bench_model, args.model)[0]
    workdir = str(Path(args.workdir) / args.model)  # one previous adapter per model
    isolated(prepare, model, args.dtype, workdir)
    gflops = isolated(matmul_gflops, DTYPES[args.dtype])[0]
    floor = None if on_gpu() else isolated(import_floor, "transformers", "trl", "peft", "selfie.training.stage")[1]
    sizes = {
        "model": model,
        "dtype": args.dtype,
        "workdir": workdir,
        "pairs": args.pairs,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "steps": args.steps,
    }
    runs = {
        "TRL DPOTrainer + PEFT LoRA (peft_config), reference = adapter disabled": (run_trl_lora, (sizes,)),
        "selfie train_iteration, refinement off": (run_selfie, (sizes, False)),
        "selfie train_iteration, refinement + DND (lambda 0.5)": (run_selfie, (sizes, True)),
    }
    results = {}
    for label, (fn, fn_args) in runs.items():
        result, peak = isolated(fn, *fn_args)
        result["peak_mib"] = peak
        results[label] = result
        logging.info("%s: %.2f s/step, peak %.0f MiB", label, statistics.median(result["step_seconds"]), peak)
    return {
        "args": vars(args),
        "matmul_gflops": gflops,
        "floor_mib": floor,
        "peak_label": peak_memory_label(),
        "results": results,
        "wall_seconds": time.perf_counter() - started,
    }


def render(raw: dict) -> tuple[str, str]:
    a, results, floor = raw["args"], raw["results"], raw["floor_mib"]
    for r in results.values():
        _summarise(r, raw["matmul_gflops"])
    trl, *ours = results.values()
    above = "" if floor is None else f" (in brackets: above the {floor:.0f} MiB that importing the libraries alone takes)"
    peak = lambda r: f"{r['peak_mib']:.0f}" + ("" if floor is None else f" ({r['peak_mib'] - floor:.0f})")  # noqa: E731
    table = "\n".join(
        f"| {label} | {r['median_step_seconds']:.3f} | {', '.join(f'{x:.3f}' for x in r['step_seconds'])} | {r['tokens_per_step']:.0f} | {peak(r)} "
        f"| {r['gflops_per_second']:.0f} ({100 * r['matmul_fraction']:.0f}%) |"
        for label, r in results.items()
    )
    verdicts = "\n".join(
        f"- {label}: **{r['median_step_seconds'] / trl['median_step_seconds']:.2f}x** the step time of TRL + LoRA "
        f"(goal <= {GOAL['time']}x), **{r['peak_mib'] / trl['peak_mib']:.2f}x** its peak memory (goal <= {GOAL['memory']}x)"
        + ("" if floor is None else f", {(r['peak_mib'] - floor) / (trl['peak_mib'] - floor):.2f}x above the import floor")
        + "."
        for label, r in zip(list(results)[1:], ours)
    )
    arithmetic = "\n".join(
        f"- {label}: {FLOPS_PER_PARAM_TOKEN} x {r['params'] / 1e6:.0f}M x {r['tokens_per_step']:.0f} tokens / "
        f"{r['median_step_seconds']:.3f} s (the median step) = {r['gflops_per_second']:.0f} GFLOP/s = **{100 * r['matmul_fraction']:.0f}%** of "
        f"{raw['matmul_gflops']:.0f}."
        for label, r in results.items()
    )
    body = f"""
`{raw["command"]}` ({raw["machine"]}; {a["dtype"]}). One DPO optimizer step on {model_label(a["model"])}:
{a["batch_size"]} pairs per step from the first {a["pairs"]} pairs of the built-in demo-seed set, max_length {a["max_length"]},
the demo recipe's TRL arguments (beta, learning rate, schedule; no gradient checkpointing) and LoRA (r 16, alpha 32, q/k/v/o)
for every method. selfie runs iteration {ITERATION} of the demo recipe (`train_iteration`: the previous iteration's adapter
continued, here a random one; reference pi_{{t-1}} = TRL's frozen copy of it). Seconds per step are the median of {a["steps"]}
steps after an untimed pass over the pairs, from the step's start to after the optimizer
update (on a GPU, synchronised at both ends). Peak memory is each method's own fresh
process ({raw["peak_label"]}){above}. Tokens per step are the step's non-pad tokens, as each method tokenises the pairs
(selfie renders a response exactly as it was judged).

| method | seconds / step (median) | every timed step (s) | tokens / step | {raw["peak_label"]} | GFLOP/s (% of matmul) |
|---|---|---|---|---|---|
{table}

{verdicts}

The matmul fraction's arithmetic: FLOPs per step = {FLOPS_PER_PARAM_TOKEN} x base parameters x tokens (6 for the policy's forward
and backward, 2 for the reference forward; LoRA skips the base weights' gradients, about 2 of the 6, so this is the
full-fine-tuning-equivalent rate), over the {a["dtype"]} matmul rate measured in the same run ({raw["matmul_gflops"]:.0f} GFLOP/s):
{arithmetic}
"""
    return section_title("Training", raw), body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--pairs", type=int, default=8, help="first pairs of demo-seed, cycled over the steps")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps after the warm-up pass")
    parser.add_argument("--max-length", type=int, default=256, help="the demo recipe's")
    parser.add_argument("--workdir", default="/tmp/selfie-bench-train")
    args = parse_args(parser, QUICK)
    title, body = render(measure_or_load(args, "train", measure))
    write_section(title, body)
    print(body)


if __name__ == "__main__":
    main()
