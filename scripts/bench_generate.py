"""Sampling throughput and peak memory: selfie's `generate_responses` against plain `model.generate`, each in a fresh process.

1. selfie: `generate_responses`: prompts sorted by length, batch_size sequences decoded together
   (prompts x K), each prompt's KV cache prefilled once and repeated for its K rows, finished rows
   leave the batch.
2. transformers: `model.generate` one prompt at a time, its K responses as num_return_sequences.

Both: smollm2-135m in float32, the first --prompts demo prompts, K responses each, --max-new-tokens,
temperature 0.7, top-p 1, no top-k, the same stop tokens. Only newly generated tokens count (the
stop token included, padding after it not). Seconds exclude model loading and a short warm-up call.

    python scripts/bench_generate.py [--quick] [--prompts 16] [--responses 2] [--max-new-tokens 48] [--batch-size 8]

Writes the "Generation" section of docs/BENCHMARKS.md and docs/bench/generate.json.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from benchlib import isolated, machine, parse_args, save_raw, write_section

MODEL = "smollm2-135m"
TEMPERATURE = 0.7
QUICK = {"prompts": 2, "responses": 2, "max_new_tokens": 8, "batch_size": 4}


def _load(n_prompts: int):
    from selfie.data import load_prompts
    from selfie.models import load_model, load_tokenizer

    return load_model(MODEL, "float32").eval(), load_tokenizer(MODEL), load_prompts("demo")[:n_prompts]


def run_selfie(n_prompts: int, responses: int, max_new_tokens: int, batch_size: int) -> dict:
    from selfie.generate import generate_responses

    model, tokenizer, prompts = _load(n_prompts)
    with tempfile.TemporaryDirectory() as tmp:
        def sample(rows: list[dict], tokens: int, name: str) -> dict:
            return generate_responses(model, tokenizer, rows, Path(tmp) / name, num_responses=responses,
                                      max_new_tokens=tokens, temperature=TEMPERATURE, top_p=1.0, seed=0,
                                      batch_size=batch_size)

        sample(prompts[:1], 2, "warmup.jsonl")
        start = time.perf_counter()
        metrics = sample(prompts, max_new_tokens, "responses.jsonl")
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "new_tokens": metrics["new_tokens"], "responses": metrics["responses"],
            "finished_fraction": metrics["finished_fraction"]}


def run_transformers(n_prompts: int, responses: int, max_new_tokens: int) -> dict:
    import torch

    from selfie.tokens import chat_ids, pad_token_id, stop_token_ids

    model, tokenizer, prompts = _load(n_prompts)
    stops = sorted(stop_token_ids(model, tokenizer))
    pad = pad_token_id(tokenizer)

    def sample(row: dict, tokens: int) -> list[tuple[int, bool]]:
        """(new tokens up to and including the first stop token, stopped) for each of the prompt's responses."""
        ids = torch.tensor([chat_ids(tokenizer, row["prompt"], True)])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=TEMPERATURE,
                                 top_p=1.0, top_k=0, max_new_tokens=tokens, num_return_sequences=responses,
                                 eos_token_id=stops, pad_token_id=pad)
        counts = []
        for new in out[:, ids.shape[1]:].tolist():
            ends = [i for i, token in enumerate(new) if token in stops]
            counts.append((ends[0] + 1, True) if ends else (len(new), False))
        return counts

    torch.manual_seed(0)
    sample(prompts[0], 2)
    start = time.perf_counter()
    counts = [c for row in prompts for c in sample(row, max_new_tokens)]
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "new_tokens": sum(n for n, _ in counts), "responses": len(counts),
            "finished_fraction": sum(stopped for _, stopped in counts) / len(counts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--responses", type=int, default=2, help="K responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8, help="selfie: sequences decoded together")
    args = parse_args(parser, QUICK)

    started = time.perf_counter()
    runs = {f"selfie generate_responses, batch {args.batch_size} sequences, length-sorted":
            (run_selfie, (args.prompts, args.responses, args.max_new_tokens, args.batch_size)),
            f"transformers model.generate, one prompt at a time (batch {args.responses})":
            (run_transformers, (args.prompts, args.responses, args.max_new_tokens))}
    results = {}
    for label, (fn, fn_args) in runs.items():
        result, peak = isolated(fn, *fn_args)
        result["peak_rss_mib"] = peak
        result["tokens_per_second"] = result["new_tokens"] / result["seconds"]
        results[label] = result
        logging.info("%s: %.1f tokens/s, peak %.0f MiB", label, result["tokens_per_second"], peak)
    ours, plain = results.values()
    save_raw("generate", {"machine": machine(), "args": vars(args), "results": results,
                          "wall_seconds": time.perf_counter() - started})

    table = "\n".join(f"| {label} | {r['tokens_per_second']:.1f} | {r['new_tokens']} | {r['seconds']:.1f} | "
                      f"{100 * r['finished_fraction']:.0f}% | {r['peak_rss_mib']:.0f} |" for label, r in results.items())
    verdict = (f"selfie samples **{ours['tokens_per_second'] / plain['tokens_per_second']:.2f}x** the tokens/s of "
               f"one-prompt-at-a-time `model.generate`, at **{ours['peak_rss_mib'] / plain['peak_rss_mib']:.2f}x** its peak RSS.")
    write_section("Generation", f"""
`python scripts/bench_generate.py{' --quick' if args.quick else ''}` ({machine()}; float32). smollm2-135m samples
{args.responses} responses to each of the first {args.prompts} demo prompts, at most {args.max_new_tokens} new tokens each,
temperature {TEMPERATURE}, top-p 1, no top-k, the same stop tokens. Tokens/s counts only newly generated tokens (the stop
token included, padding not), over the whole set; seconds exclude model loading and a short warm-up call. Peak RSS is each
method's own fresh process, imports and model included.

| method | new tokens/s | new tokens | seconds | responses stopped before the limit | peak RSS MiB |
|---|---|---|---|---|---|
{table}

{verdict} Both sample (their random streams differ), so the token counts differ; the rate is per token.
""")
    print(verdict)


if __name__ == "__main__":
    main()
