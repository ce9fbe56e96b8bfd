"""Sampling throughput and peak memory: selfie's generation backends against batched `model.generate`, each in a
fresh process, at each batch size given, and each against the machine's limits.

1. selfie static: `generate_responses(backend="static")`: prompts sorted by length, batch_size sequences
   decoded together (prompts x K), each prompt's KV cache prefilled once and repeated for its K rows,
   finished rows leave the batch.
2. selfie continuous: `generate_responses(backend="continuous")`: transformers' continuous-batching engine,
   batch_size sequences in flight, a finished one's slot refilled at once.
3. transformers: `model.generate` on batches of batch_size sequences (batch_size / K prompts, K responses
   each as num_return_sequences), left padding, prompts in their given order: what a TRL user runs.
4. selfie vllm: `generate_responses(backend="vllm")`: vLLM's engine in its worker process, batch_size sequences
   scheduled at once (max_num_seqs). The worker's start-up (interpreter, imports, engine) is reported apart and
   left out of its seconds; a fresh engine per call, so no warm-up. Left out where vLLM is not installed, and for
   --mean-response-tokens (the stop-token bias is a change to the model in this process).

All: the same prompts, K responses each, --max-new-tokens, temperature 0.7, top-p 1, no top-k, the same stop
tokens. Only newly generated tokens count (the stop token included, padding after it not). Seconds exclude
model loading and a warm-up (`warm_up`). Peak memory on CPU is the process's peak RSS plus its largest child's
(vLLM's worker). The bounds: the seconds the same tokens need at least, from the
machine's copy bandwidth (every decode step reads the weights, each sequence its KV cache) and from its
matmul rate (2 x matmul parameters per token, prompts once each); see `bounds`.

    python -m scripts.benchmarks.generate [--quick] [--prompts 32] [--responses 2] [--max-new-tokens 96] [--batch-size 16 64]
    python -m scripts.benchmarks.generate --model random-llama-1b --dtype bfloat16 --prompts 256 --batch-size 64 ... (on a GPU)

Writes the "Generation" section of docs/BENCHMARKS.md (on a GPU: "Generation on <device>") and
docs/bench/generate.json (generate-gpu.json); --render JSON rewrites the section from a saved result.
"""

from __future__ import annotations

import argparse
import logging
import math
import resource
import tempfile
import time
from pathlib import Path

import torch

from scripts.benchlib import (
    DTYPES,
    add_model_args,
    bench_model,
    copy_gbps,
    device,
    end_responses_after,
    isolated,
    matmul_gflops,
    measure_or_load,
    model_label,
    on_gpu,
    parse_args,
    peak_memory_label,
    section_title,
    write_section,
)

TEMPERATURE = 0.7
QUICK = {"prompts": 8, "responses": 2, "max_new_tokens": 8, "batch_size": [4]}
METHODS = {  # label of each method, at a batch size
    "static": "selfie static, batch {} sequences, length-sorted",
    "continuous": "selfie continuous, {} sequences in flight",
    "transformers": "transformers model.generate, batches of {} sequences, left padding, unsorted",
    "vllm": "selfie vllm (vLLM {version}), {} sequences scheduled at once",
}


def _prompts(args: dict) -> list[dict]:
    from selfie.data import load_prompts

    return load_prompts("demo")[: args["prompts"]]


def _load(args: dict):
    """Model (on the GPU when there is one), tokenizer, prompts; a random model gets its stop-token bias."""
    from selfie.models import load_model, load_tokenizer
    from selfie.tokens import chat_ids

    tokenizer = load_tokenizer(args["model"])
    model = load_model(args["model"], args["dtype"]).to(device()).eval()
    prompts = _prompts(args)
    if args["mean_response_tokens"]:
        calibration = torch.tensor([chat_ids(tokenizer, prompts[0]["prompt"], True)])
        end_responses_after(model, tokenizer.eos_token_id, args["mean_response_tokens"], calibration, TEMPERATURE)
    return model, tokenizer, prompts


def model_shape(model) -> dict:
    """What the bounds need: bytes a decode step reads for the weights (every matmul weight once: the
    embedding lookup reads a few rows only), bytes of one token's KV cache, matmul parameters."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    return {
        "matmul_params": sum(m.weight.numel() for m in linears),
        "decode_weight_bytes": sum(p.numel() * p.element_size() for m in linears for p in m.parameters()),
        "kv_bytes_per_token": 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element,
    }


def meta_shape(name: str, dtype: str) -> dict:
    """model_shape of a model this process does not load (vLLM's worker does): built on the meta device."""
    from transformers import AutoModelForCausalLM

    from selfie.models import load_model_config, resolve_dtype

    with torch.device("meta"):
        return model_shape(AutoModelForCausalLM.from_config(load_model_config(name), dtype=resolve_dtype(dtype)))


def vllm_version() -> str | None:
    """vLLM's version in the environment selfie would run it from, None where there is none."""
    from selfie.errors import SelfieError
    from selfie.generation import vllm_backend

    try:
        return vllm_backend.version(vllm_backend.interpreter())
    except SelfieError as e:
        logging.info("no vllm rows: %s", e)
        return None


def run_selfie(args: dict, backend: str, batch_size: int) -> dict:
    import selfie.generation.generate as gen
    from selfie.generation import vllm_backend
    from selfie.io import read_jsonl

    if backend == "vllm":
        model, tokenizer = gen.load_generator(args["model"], None, args["dtype"], "vllm", device())
        prompts, shape = _prompts(args), meta_shape(args["model"], args["dtype"])
    else:
        model, tokenizer, prompts = _load(args)
        shape = model_shape(model)
    lengths: list[tuple[int, int]] = []  # (prompt tokens, new tokens) of every response, for the bounds
    real = vllm_backend.sample_vllm if backend == "vllm" else gen.SAMPLERS[backend]

    def counted(model, items, s, *rest):
        ids = {row["prompt_id"]: len(i) for i, row in items}
        for group in real(model, items, s, *rest):
            lengths.extend((ids[row["prompt_id"]], len(t) + stopped) for row, outs in group for t, stopped in outs)
            yield group

    if backend == "vllm":
        vllm_backend.sample_vllm = counted  # generate_responses calls it through the module
    else:
        gen.SAMPLERS[backend] = counted
    with tempfile.TemporaryDirectory() as tmp:

        def sample(rows: list[dict], tokens: int, name: str) -> dict:
            return gen.generate_responses(
                model,
                tokenizer,
                rows,
                Path(tmp) / name,
                num_responses=args["responses"],
                max_new_tokens=tokens,
                temperature=TEMPERATURE,
                top_p=1.0,
                seed=0,
                batch_size=batch_size,
                backend=backend,
            )

        if backend != "vllm":  # vLLM: a fresh engine per call, warmed up by its own start-up
            warm_up(
                lambda: sample(prompts[: max(1, batch_size // args["responses"])], max(1, args["max_new_tokens"] // 4), "warm")
            )
            lengths.clear()
        start = time.perf_counter()
        metrics = sample(prompts, args["max_new_tokens"], "responses.jsonl")
        seconds = time.perf_counter() - start - metrics.get("worker_start_seconds", 0)
        texts = [response for row in read_jsonl(Path(tmp) / "responses.jsonl") for response in row["responses"]]
    return {
        "seconds": seconds,
        "new_tokens": metrics["new_tokens"],
        "responses": metrics["responses"],
        "finished_fraction": metrics["finished_fraction"],
        "lengths": lengths,
        "texts": texts,
        **{key: metrics[key] for key in ("worker_start_seconds", "engine_startup_seconds") if key in metrics},
        # vLLM's worker is this process's largest child (others are short helper processes of the imports): its
        # peak RSS is not in this process's own
        **({"worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024} if backend == "vllm" else {}),
        **shape,
    }


def warm_up(sample) -> None:
    """One full batch of prompts at a quarter of the token limit, untimed: the kernels of every batch shape a run
    meets (rows leave one by one) are chosen and loaded before the clock starts."""
    sample()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_transformers(args: dict, batch_size: int) -> dict:
    from selfie.tokens import chat_ids, pad_token_id, stop_token_ids

    model, tokenizer, prompts = _load(args)
    stops = sorted(stop_token_ids(model, tokenizer))
    k, per_batch = args["responses"], max(1, batch_size // args["responses"])

    def sample(rows: list[dict], tokens: int) -> list[tuple[int, int, bool]]:
        """(prompt tokens, new tokens up to and including the first stop token, stopped) of each response."""
        encoded = [chat_ids(tokenizer, row["prompt"], True) for row in rows]
        batch = tokenizer.pad({"input_ids": encoded}, padding=True, return_tensors="pt").to(model.device)  # left
        with torch.inference_mode():
            out = model.generate(
                **batch,
                do_sample=True,
                temperature=TEMPERATURE,
                top_p=1.0,
                top_k=0,
                max_new_tokens=tokens,
                num_return_sequences=k,
                eos_token_id=stops,
                pad_token_id=pad_token_id(tokenizer),
            )
        counts = []
        for row, new in enumerate(out[:, batch["input_ids"].shape[1] :].tolist()):
            ends = [i for i, token in enumerate(new) if token in stops]
            counts.append((len(encoded[row // k]), *((ends[0] + 1, True) if ends else (len(new), False))))
        return counts

    torch.manual_seed(0)
    warm_up(lambda: sample(prompts[:per_batch], max(1, args["max_new_tokens"] // 4)))
    start = time.perf_counter()
    counts = [c for b in range(0, len(prompts), per_batch) for c in sample(prompts[b : b + per_batch], args["max_new_tokens"])]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "new_tokens": sum(n for _, n, _ in counts),
        "responses": len(counts),
        "finished_fraction": sum(stopped for *_, stopped in counts) / len(counts),
        "lengths": [(p, n) for p, n, _ in counts],
        **model_shape(model),
    }


def bounds(r: dict, batch_size: int, gbps: float, gflops: float, responses: int) -> dict:
    """The least seconds any engine needs for this run's tokens, and the share of it this run reached.

    Bandwidth: ceil(new tokens / batch_size) decode steps each read every matmul weight once, and each new token
    reads its sequence's KV cache so far (prompt + tokens before it): bytes / copy bandwidth. Matmul: 2 x matmul
    parameters x (each prompt once + every new token) FLOPs / matmul rate. Attention FLOPs are left out of both."""
    steps = math.ceil(r["new_tokens"] / batch_size)
    kv_tokens = sum(n * p + n * (n - 1) // 2 for p, n in r["lengths"])
    read = steps * r["decode_weight_bytes"] + kv_tokens * r["kv_bytes_per_token"]
    prompt_tokens = sum(p for p, _ in r["lengths"][::responses])
    flops = 2 * r["matmul_params"] * (prompt_tokens + r["new_tokens"])
    return {
        "steps": steps,
        "kv_tokens_read": kv_tokens,
        "bytes_read": read,
        "bandwidth_seconds": read / (gbps * 1e9),
        "bandwidth_fraction": read / (gbps * 1e9) / r["seconds"],
        "flops": flops,
        "matmul_seconds": flops / (gflops * 1e9),
        "matmul_fraction": flops / (gflops * 1e9) / r["seconds"],
    }


def ceilings(dtype: str) -> dict:
    return {"copy_gbps": copy_gbps(), "matmul_gflops": matmul_gflops(DTYPES[dtype])}


def measure(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    sizes = {
        "model": isolated(bench_model, args.model)[0],
        "dtype": args.dtype,
        "prompts": args.prompts,
        "responses": args.responses,
        "max_new_tokens": args.max_new_tokens,
        "mean_response_tokens": args.mean_response_tokens,
    }
    limits = isolated(ceilings, args.dtype)[0]
    version = None if args.mean_response_tokens else vllm_version()
    results, identical = {}, {}
    for batch_size in args.batch_size:
        runs = {
            "static": (run_selfie, (sizes, "static", batch_size)),
            "continuous": (run_selfie, (sizes, "continuous", batch_size)),
            "transformers": (run_transformers, (sizes, batch_size)),
            **({"vllm": (run_selfie, (sizes, "vllm", batch_size))} if version else {}),
        }
        texts = {}
        for method, (fn, fn_args) in runs.items():
            result, peak = isolated(fn, *fn_args)
            texts[method] = result.pop("texts", None)
            # vLLM's GPU memory is its worker's, which torch in this process does not see
            unseen = on_gpu() and method == "vllm"
            result.update(
                method=method,
                batch_size=batch_size,
                process_peak_mib=peak,
                peak_mib=None if unseen else peak + result.get("worker_peak_mib", 0),
                tokens_per_second=result["new_tokens"] / result["seconds"],
                **bounds(result, batch_size, limits["copy_gbps"], limits["matmul_gflops"], args.responses),
            )
            result.pop("lengths")
            label = METHODS[method].format(batch_size, version=version)
            results[label] = result
            logging.info("%s: %.1f tokens/s, peak %s MiB", label, result["tokens_per_second"], result["peak_mib"])
        identical[batch_size] = sum(a == b for a, b in zip(texts["static"], texts["continuous"])) / len(texts["static"])
    return {
        "args": {**vars(args), "model": args.model},
        **limits,
        "peak_label": peak_memory_label(),
        "vllm_version": version,
        "results": results,
        "identical_responses": identical,
        "wall_seconds": time.perf_counter() - started,
    }


def render(raw: dict) -> tuple[str, str]:
    a, results = raw["args"], raw["results"]
    by = {(r["method"], r["batch_size"]): r for r in results.values()}
    sizes = a["batch_size"]
    mib = lambda r: "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"  # noqa: E731
    table = "\n".join(
        f"| {label} | {r['tokens_per_second']:.1f} | {r['new_tokens']} | {r['seconds']:.1f} | {100 * r['finished_fraction']:.0f}% "
        f"| {mib(r)} | {100 * r['bandwidth_fraction']:.0f}% | {100 * r['matmul_fraction']:.1f}% |"
        for label, r in results.items()
    )
    names = {"static": "selfie static", "continuous": "selfie continuous", "vllm": "selfie vllm"}

    def against_generate(b: int) -> str:
        plain = by["transformers", b]
        parts = [
            f"{name} **{by[m, b]['tokens_per_second'] / plain['tokens_per_second']:.2f}x** its tokens/s"
            + ("" if by[m, b]["peak_mib"] is None else f" at **{by[m, b]['peak_mib'] / plain['peak_mib']:.2f}x** its peak memory")
            for m, name in names.items()
            if (m, b) in by
        ]
        return f"- batch {b}: " + "; ".join(parts) + "."

    verdict = "Against batched `model.generate` at the same batch size:\n" + "\n".join(against_generate(b) for b in sizes)
    if len(sizes) > 1:
        low, high = sizes[0], sizes[-1]
        verdict += (
            f"\n\nFrom batch {low} to {high}, tokens/s grew "
            + ", ".join(
                f"{by[m, high]['tokens_per_second'] / by[m, low]['tokens_per_second']:.2f}x for {name}"
                for m, name in {**names, "transformers": "model.generate"}.items()
                if (m, low) in by
            )
            + "."
        )
    startup = ""
    if raw.get("vllm_version"):
        starts = "; ".join(
            f"batch {b}: {by['vllm', b]['worker_start_seconds']:.1f} s (the engine {by['vllm', b]['engine_startup_seconds']:.1f} s of it)"
            for b in sizes
        )
        startup = (
            f"\n\nvLLM's worker start-up (interpreter, imports, engine build with its profile run; not in its seconds above): "
            f"{starts}. A generate stage pays it once, however many prompts it samples."
        )
    else:
        startup = "\n\nNo vLLM rows: " + (
            "--mean-response-tokens changes the model in this process, which vLLM's worker does not load."
            if a.get("mean_response_tokens")
            else "vLLM was not installed where selfie looks for it (`make vllm-env`)."
        )
    same = ", ".join(f"{100 * share:.0f}% at batch {b}" for b, share in raw["identical_responses"].items())
    differ = (
        " (the others differ where another batch layout rounded a logit differently and a draw flipped)"
        if min(raw["identical_responses"].values()) < 1
        else ""
    )
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    arithmetic = "\n".join(
        f"- {label}: {r['steps']} steps x {gb(r['decode_weight_bytes'])} weights + {r['kv_tokens_read']:,} KV tokens "
        f"x {r['kv_bytes_per_token'] / 1e3:.1f} kB = {gb(r['bytes_read'])} / {raw['copy_gbps']:.1f} GB/s = "
        f"{r['bandwidth_seconds']:.2f} s, **{100 * r['bandwidth_fraction']:.0f}%** of the {r['seconds']:.1f} s taken; "
        f"{r['flops'] / 1e12:.2f} TFLOP / {raw['matmul_gflops']:.0f} GFLOP/s = {r['matmul_seconds']:.2f} s, "
        f"**{100 * r['matmul_fraction']:.1f}%**."
        for label, r in results.items()
    )
    any_run = next(iter(results.values()))
    model = f"{model_label(a['model'])}, {any_run['matmul_params'] / 1e9:.2f}B matmul parameters,"
    stop_note = (
        f" The model's weights are random, so a bias on the stop token's logit ends a response after "
        f"{a['mean_response_tokens']} tokens on average (each token a stop with probability 1/{a['mean_response_tokens']}), "
        "as varied as real responses' lengths."
        if a.get("mean_response_tokens")
        else ""
    )
    body = f"""
`{raw["command"]}` ({raw["machine"]}; {a["dtype"]}). {model} samples
{a["responses"]} responses to each of the first {a["prompts"]} demo prompts, at most {a["max_new_tokens"]} new tokens each,
temperature {TEMPERATURE}, top-p 1, no top-k, the same stop tokens, at batch sizes {", ".join(map(str, sizes))} (sequences
decoded together).{stop_note} Tokens/s counts only newly generated tokens (the stop token included, padding not), over the
whole set; seconds exclude model loading and an untimed warm-up (one batch of prompts at a quarter of the token limit;
vLLM: its worker's start-up, given below). Peak memory is each method's own fresh process ({raw["peak_label"]}; vLLM:
the process plus its worker's peak RSS). The last two columns are the share of the least time the run's own tokens need,
from the machine's memory bandwidth ({raw["copy_gbps"]:.1f} GB/s, a large copy: bytes read + written) and from its
{a["dtype"]} matmul rate ({raw["matmul_gflops"]:.0f} GFLOP/s), both measured in the same run.

| method | new tokens/s | new tokens | seconds | responses stopped before the limit | {raw["peak_label"]} | % of bandwidth bound | % of matmul bound |
|---|---|---|---|---|---|---|---|
{table}

{verdict}{startup}

selfie's static and continuous backends give each response the same seeded generator: their responses are identical
for {same}{differ}. vLLM gets the same per-response seeds but samples with its own sampler, so its responses are
others (docs/DESIGN.md section 2.7); `model.generate` samples from one shared random stream. The methods' token counts
differ, so the rate is per token.

The bounds' arithmetic: bandwidth = ceil(new tokens / batch size) decode steps, each reading every matmul weight once,
plus each new token reading its sequence's KV cache so far (prompt + the tokens before it); matmul = 2 x
{any_run["matmul_params"] / 1e6:.0f}M matmul parameters x (each prompt once + every new token). Attention FLOPs are left out.
{arithmetic}
"""
    return section_title("Generation", raw), body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--responses", type=int, default=2, help="K responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[16, 64],
        help="sequences decoded together, for every method: each size a run",
    )
    parser.add_argument(
        "--mean-response-tokens",
        type=int,
        default=0,
        help="random models: bias the stop token so responses end after this many tokens on average",
    )
    args = parse_args(parser, QUICK)
    raw = measure_or_load(args, "generate", measure)
    title, body = render(raw)
    write_section(title, body)
    print(body)


if __name__ == "__main__":
    main()
