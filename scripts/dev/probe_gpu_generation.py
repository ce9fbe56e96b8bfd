"""Two facts behind the GPU generation figures, printed (not a docs section): the continuous engine's attention path,
and how much of the static backend's time a first pass over new batch shapes takes.

On 64 demo prompts x 2 responses, batch size 64 sequences, at most 128 new tokens (the random model of
bench_generate.py, its responses ending after 128 tokens on average): the continuous backend with paged eager attention (selfie's choice,
selfie.generation.continuous.ENGINE_ATTENTION), with paged SDPA, and eager again (its first run also warms up); then the static
backend twice on the identical workload.

    python -m scripts.dev.probe_gpu_generation [--model random-llama-1b] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import time

import torch

import selfie.generation.continuous as continuous
from selfie.data import load_prompts
from selfie.generation.generate import SAMPLERS
from selfie.generation.sampler import SamplingSettings
from selfie.models import load_model, load_tokenizer
from selfie.tokens import chat_ids, pad_token_id, stop_token_ids

from scripts.benchlib import bench_model, device, end_responses_after


def timed(backend: str, model, items, s: SamplingSettings) -> str:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = sum(len(t) + stopped for group in SAMPLERS[backend](model, items, s) for _, outs in group for t, stopped in outs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return f"{tokens} tokens in {seconds:.2f} s = {tokens / seconds:.0f} tokens/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random-llama-1b")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    path = bench_model(args.model)
    tokenizer, model = load_tokenizer(path), load_model(path, args.dtype).to(device()).eval()
    prompts = load_prompts("demo")[:64]
    end_responses_after(model, tokenizer.eos_token_id, 128, torch.tensor([chat_ids(tokenizer, prompts[0]["prompt"], True)]), 0.7)
    items = [(chat_ids(tokenizer, row["prompt"], True), row) for row in prompts]
    s = SamplingSettings(
        2, 128, 0.7, 1.0, 0, 64, stop_token_ids(model, tokenizer), pad_token_id(tokenizer), torch.device(device())
    )
    for attention in ("eager", "sdpa", "eager"):
        continuous.ENGINE_ATTENTION = attention
        print(f"continuous paged {attention}: {timed('continuous', model, items, s)}", flush=True)
    for _ in range(2):
        print(f"static: {timed('static', model, items, s)}", flush=True)


if __name__ == "__main__":
    main()
