"""Judge throughput and peak memory: selfie's judge against TRL's evaluation of the same LoRA route, each in a fresh
process.

1. selfie: `judge_responses`: one model copy (reference = adapter disabled), prompt + K responses
   packed in one row, token-budget batches, lm_head only at response positions.
2. TRL: `DPOTrainer.evaluate` over the same pairs, the policy the same PeftModel (base + the adapter), no
   ref_model: TRL's reference is then the adapter disabled, as selfie's (precompute off).

The responses are sampled once beforehand (the model + a random LoRA adapter, demo prompts) and cached in
--workdir, one folder per (model, prompts, max_new_tokens). Peak memory is each child process's peak (GPU memory
on a GPU, else RSS, imports included); on CPU the "floor" is a child that only imports torch, transformers,
TRL and selfie, and the "one weight copy" line a child that loads what selfie's judge loads and pages every
weight in without judging.

    python -m scripts.benchmarks.judge [--quick] [--prompts 32] [--max-new-tokens 64] [--workdir /tmp/selfie-bench-judge]
    python -m scripts.benchmarks.judge --model random-llama-1b --dtype bfloat16 ... (on a GPU)

Writes the "Judge" section of docs/BENCHMARKS.md (on a GPU: "Judge on <device>") and docs/bench/judge.json
(judge-gpu.json); --render JSON rewrites the section from a saved result.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from scripts.benchlib import (
    DTYPES,
    add_model_args,
    bench_model,
    device,
    import_floor,
    isolated,
    matmul_gflops,
    measure_or_load,
    model_label,
    on_gpu,
    param_count,
    parse_args,
    peak_memory_label,
    random_lora,
    section_title,
    write_section,
)

PRECISION_ROWS = 4  # prompts re-scored in float64 to measure each method's rounding error (CPU only: float64 on CPU)
QUICK = {"prompts": 2, "max_new_tokens": 8, "repeats": 1, "token_budgets": "1024", "workdir": "/tmp/selfie-bench-judge-quick"}


def prepare(model: str, dtype: str, workdir: str, n_prompts: int, max_new_tokens: int) -> None:
    """A LoRA adapter with random (non-zero) weights and K=2 responses per demo prompt, made once."""
    work = Path(workdir)
    if (work / "responses.jsonl").exists():
        return
    from selfie.data import load_prompts
    from selfie.generation.generate import generate_responses
    from selfie.models import load_tokenizer, save_adapter

    policy = random_lora(model, dtype=dtype)
    save_adapter(policy, work / "adapter")
    prompts = load_prompts("demo")[:n_prompts]
    generate_responses(
        policy.to(device()).eval(),
        load_tokenizer(model),
        prompts,
        work / "responses.jsonl",
        num_responses=2,
        max_new_tokens=max_new_tokens,
        batch_size=16,
        backend="static",
    )


def _best_of(repeats: int, fn) -> tuple[float, object]:
    """Fastest of `repeats` timed calls (the machine is shared: the minimum is the least disturbed run)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def run_selfie(model: str, dtype: str, workdir: str, token_budget: int, repeats: int) -> dict:
    from selfie.config.schema import JudgeConfig
    from selfie.io import read_jsonl
    from selfie.labelling.implicit_reward import judge_responses
    from selfie.models import load_policy

    start = time.perf_counter()
    policy, tokenizer = load_policy(model, Path(workdir) / "adapter", dtype)
    policy.to(device())
    loaded = time.perf_counter()
    rows = read_jsonl(Path(workdir) / "responses.jsonl")
    out = Path(workdir) / f"judgments-{token_budget}.jsonl"
    seconds, metrics = _best_of(
        repeats, lambda: judge_responses(policy, tokenizer, rows, out, None, judge=JudgeConfig(token_budget=token_budget))
    )
    return {
        "load_seconds": loaded - start,
        "seconds": seconds,
        "pairs": len(rows),
        "tokens": metrics["tokens"],
        "padded_tokens": metrics["padded_tokens"],
        "params": param_count(policy.get_base_model()),
        "policy_logps": [v for j in read_jsonl(out) for v in j["policy_logps"]],
    }


def one_copy_floor(model: str, dtype: str, workdir: str) -> dict:
    """What any one-copy judge holds before its first activation: run_selfie's loads with every weight paged in."""
    from selfie.models import load_policy

    policy, _ = load_policy(model, Path(workdir) / "adapter", dtype)
    policy.to(device())
    with torch.no_grad():
        for param in policy.parameters():
            param.sum()  # reads the whole tensor: the memory-mapped weights become resident
    return {}


def _naive_logps(policy, reference, tokenizer, rows: list[dict]) -> tuple[list[float], int]:
    """Policy log-probs (and tokens run per pass), one sequence at a time, full log_softmax, both models."""
    import torch

    from selfie.tokens import response_token_ids, stop_token_ids

    stops = stop_token_ids(reference, tokenizer)
    policy_logps, tokens = [], 0
    with torch.no_grad():
        for row in rows:
            prompt, responses = response_token_ids(tokenizer, row["prompt"], row["responses"], row["finished"], stops)
            for response in responses:
                ids = torch.tensor([prompt + response])
                tokens += ids.shape[1]
                for model in (policy, reference):
                    logps = torch.log_softmax(model(ids).logits[0], dim=-1)
                    positions = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
                    value = logps[positions, ids[0, len(prompt) :]].sum().item()
                    if model is policy:
                        policy_logps.append(value)
    return policy_logps, tokens


def naive_logps(model: str, workdir: str, n_rows: int, dtype: torch.dtype) -> list[float]:
    """The first rows' policy log-probs computed plainly (one sequence at a time, full log_softmax) in `dtype`:
    in float64 the exact-ish answer, in float32 what a plain implementation's rounding gives."""
    from selfie.io import read_jsonl
    from selfie.models import load_adapter, load_model, load_tokenizer

    policy = load_adapter(load_model(model, "float32"), Path(workdir) / "adapter").to(dtype).eval()
    rows = read_jsonl(Path(workdir) / "responses.jsonl")[:n_rows]
    return _naive_logps(policy, load_model(model, "float32").to(dtype).eval(), load_tokenizer(model), rows)[0]


def run_trl_lora(model: str, dtype: str, workdir: str, batch_size: int, repeats: int) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from selfie.io import read_jsonl
    from selfie.models import load_adapter, load_model, load_tokenizer

    start = time.perf_counter()
    tokenizer = load_tokenizer(model)
    policy = load_adapter(load_model(model, dtype), Path(workdir) / "adapter")
    loaded = time.perf_counter()
    rows = read_jsonl(Path(workdir) / "responses.jsonl")
    pairs = Dataset.from_list(
        [
            {
                "prompt": r["prompt"],
                "chosen": [{"role": "assistant", "content": r["responses"][0]}],
                "rejected": [{"role": "assistant", "content": r["responses"][1]}],
            }
            for r in rows
        ]
    )
    args = DPOConfig(
        output_dir=str(Path(workdir) / "trl"),
        per_device_eval_batch_size=batch_size,
        report_to="none",
        use_cpu=not on_gpu(),
        bf16=dtype == "bfloat16",
        precompute_ref_log_probs=False,
        max_length=None,
        beta=0.1,
        disable_tqdm=True,
    )  # bf16 only when the model is: TRL defaults to it, ~4x slower on a CPU
    trainer = DPOTrainer(model=policy, args=args, train_dataset=pairs, eval_dataset=pairs, processing_class=tokenizer)
    ready = time.perf_counter()
    seconds, result = _best_of(repeats, trainer.evaluate)
    tokens = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in trainer.eval_dataset)
    return {
        "load_seconds": loaded - start,
        "setup_seconds": ready - loaded,
        "seconds": seconds,
        "pairs": len(rows),
        "tokens": tokens,
        "params": param_count(policy.get_base_model()),
        "eval_rewards_chosen": result.get("eval_rewards/chosen"),
    }


def measure(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    model = isolated(bench_model, args.model)[0]
    workdir = str(Path(args.workdir) / f"{args.model}-{args.prompts}x{args.max_new_tokens}")  # other sizes stay apart
    isolated(prepare, model, args.dtype, workdir, args.prompts, args.max_new_tokens)
    gflops = isolated(matmul_gflops, DTYPES[args.dtype])[0]
    floor = None if on_gpu() else isolated(import_floor, "transformers", "trl", "selfie.labelling.implicit_reward")[1]
    one_copy = isolated(one_copy_floor, model, args.dtype, workdir)[1]
    budgets = [int(b) for b in args.token_budgets.split(",")]
    runs = [(f"selfie judge, token budget {b}", run_selfie, (model, args.dtype, workdir, b, args.repeats)) for b in budgets]
    runs.append(
        (
            f"TRL DPOTrainer.evaluate, PeftModel, reference = adapter disabled, batch {args.trl_batch_size}",
            run_trl_lora,
            (model, args.dtype, workdir, args.trl_batch_size, args.repeats),
        )
    )
    results = {}
    for label, fn, fn_args in runs:
        result, peak = isolated(fn, *fn_args)
        result["peak_mib"] = peak
        result["pairs_per_second"] = result["pairs"] / result["seconds"]
        result["gflops_per_second"] = 2 * 2 * result["params"] * result["tokens"] / result["seconds"] / 1e9
        result["matmul_fraction"] = result["gflops_per_second"] / gflops
        results[label] = result
        logging.info("%s: %.2f pairs/s, peak %.0f MiB", label, result["pairs_per_second"], peak)
    error = None
    if not on_gpu():  # float64 references are CPU work
        exact = isolated(naive_logps, model, workdir, PRECISION_ROWS, torch.float64)[0]
        plain = isolated(naive_logps, model, workdir, PRECISION_ROWS, torch.float32)[0]
        ours = results[runs[-2][0]]["policy_logps"]
        error = {
            name: max(abs(a - b) / abs(b) for a, b in zip(values, exact)) for name, values in (("selfie", ours), ("plain", plain))
        }
    for r in results.values():
        r.pop("policy_logps", None)
    return {
        "args": vars(args),
        "matmul_gflops": gflops,
        "floor_mib": floor,
        "one_copy_mib": one_copy,
        "peak_label": peak_memory_label(),
        "max_rel_logp_error_vs_float64": error,
        "results": results,
        "wall_seconds": time.perf_counter() - started,
    }


def render(raw: dict) -> tuple[str, str]:
    a, results, floor = raw["args"], raw["results"], raw["floor_mib"]
    *ours, trl = results.values()
    above = lambda r: "" if floor is None else f" ({r['peak_mib'] - floor:.0f})"  # noqa: E731
    table = "\n".join(
        f"| {label} | {r['pairs_per_second']:.2f} | {r['seconds']:.2f} | {r['tokens']} | {r['peak_mib']:.0f}{above(r)} "
        f"| {r['gflops_per_second']:.0f} ({100 * r['matmul_fraction']:.0f}%) |"
        for label, r in results.items()
    )
    verdicts = "\n".join(
        f"- {label}: **{r['pairs_per_second'] / trl['pairs_per_second']:.2f}x** the pairs/s of TRL's evaluation, at "
        f"**{r['peak_mib'] / trl['peak_mib']:.2f}x** its peak memory"
        + ("" if floor is None else f" ({(r['peak_mib'] - floor) / (trl['peak_mib'] - floor):.2f}x above the import floor)")
        + "."
        for label, r in zip(results, ours)
    )
    arithmetic = "\n".join(
        f"- {label}: 2 x 2 x {r['params'] / 1e6:.0f}M x {r['tokens']} tokens / {r['seconds']:.2f} s = {r['gflops_per_second']:.0f} "
        f"GFLOP/s = **{100 * r['matmul_fraction']:.0f}%** of {raw['matmul_gflops']:.0f}."
        for label, r in results.items()
    )
    error = raw["max_rel_logp_error_vs_float64"]
    precision = (
        "- Precision not measured here (float64 references are computed on CPU runs only)."
        if error is None
        else f"- Precision, against the same computation in float64 (first {PRECISION_ROWS} prompts): selfie's float32 log-probs "
        f"are within a relative {error['selfie']:.1e}, a plain float32 full log_softmax within {error['plain']:.1e} "
        "(selfie sums in float64)."
    )
    body = f"""
`{raw["command"]}` ({raw["machine"]}; {a["dtype"]}). {a["prompts"]} demo prompts x 2 responses sampled by {model_label(a["model"])}
with a random LoRA adapter (r 16 on q/k/v/o), max_new_tokens {a["max_new_tokens"]}; both methods compute policy and reference
log-probs of both responses of each prompt (one pair per prompt), from one weight copy (reference = adapter disabled).
Seconds exclude model loading and are the fastest of {a["repeats"]} runs. Peak memory is each method's own fresh process
({raw["peak_label"]}{"" if floor is None else f"; in brackets: above the {floor:.0f} MiB that importing the libraries alone takes"}).

| method | pairs/s | seconds | tokens per pass | {raw["peak_label"]} | GFLOP/s (% of matmul) |
|---|---|---|---|---|---|
{table}

{verdicts}
- One weight copy alone: the imports, the tokenizer and the model + adapter with every weight resident, nothing judged,
  peak at {raw["one_copy_mib"]:.0f} MiB = **{raw["one_copy_mib"] / trl["peak_mib"]:.2f}x** TRL's peak: the least any judge
  holding the weights can reach here. On top of it selfie's judging adds {ours[-1]["peak_mib"] - raw["one_copy_mib"]:.0f} MiB
  (token budget {a["token_budgets"].split(",")[-1]}: one batch's activations, allocator and kernel pages).
{precision}

The matmul fraction's arithmetic: FLOPs = 2 x base parameters x tokens per pass x 2 passes (policy, reference), over the
tokens each method actually runs, against the {a["dtype"]} matmul rate measured in the same run ({raw["matmul_gflops"]:.0f} GFLOP/s):
{arithmetic}
"""
    return section_title("Judge", raw), body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--workdir", default="/tmp/selfie-bench-judge")
    parser.add_argument("--token-budgets", default="8192,512", help="selfie rows: the default budget and the CPU recipes' one")
    parser.add_argument("--trl-batch-size", type=int, default=8, help="pairs per TRL eval batch (2x sequences)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per method; the fastest counts")
    args = parse_args(parser, QUICK)
    title, body = render(measure_or_load(args, "judge", measure))
    write_section(title, body)
    print(body)


if __name__ == "__main__":
    main()
