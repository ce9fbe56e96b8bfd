"""Shared pieces of the benchmark scripts: machine line, matmul ceiling, isolated runs, docs/BENCHMARKS.md sections."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import multiprocessing as mp
import os
import platform
import re
import resource
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from typing import Any

import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"
QUICK_DOCS = Path(tempfile.gettempdir()) / "selfie-bench-quick"


def docs_dir() -> Path:
    """docs/, or $SELFIE_BENCH_DOCS: where --quick runs write, so a smoke run never replaces a measurement."""
    return Path(os.environ.get("SELFIE_BENCH_DOCS", DOCS))


def use_quick_docs() -> Path:
    """Send this process's (and its children's) sections and raw results to QUICK_DOCS unless already redirected."""
    return Path(os.environ.setdefault("SELFIE_BENCH_DOCS", str(QUICK_DOCS)))


def machine() -> str:
    return (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
            f"torch {torch.__version__}, {'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")


def matmul_gflops(n: int = 1024, repeats: int = 10, tries: int = 3) -> float:
    """This machine's float32 matmul throughput: the ceiling the other figures are a fraction of.

    The best of `tries` timings: the machine is shared, and the least disturbed one is the ceiling."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * repeats / best / 1e9


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def import_floor(*modules: str) -> dict:
    """Import the modules and nothing else: run isolated, its peak RSS is the floor every method pays."""
    for module in modules:
        importlib.import_module(module)
    return {}


def random_lora(model_name: str, seed: int = 0):
    """The model with a fresh LoRA adapter (selfie's defaults, no dropout) whose B matrices are random, so the
    adapter changes the model (a fresh one is the identity)."""
    from selfie.config import LoraConfig
    from selfie.models import attach_lora, load_model

    torch.manual_seed(seed)
    policy = attach_lora(load_model(model_name, "float32"), LoraConfig(dropout=0.0))
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return policy


def _child(fn: Callable, args: tuple, queue: mp.Queue) -> None:
    try:
        result, error = fn(*args), None
    except BaseException:  # reported to the parent, which would otherwise wait for a result forever
        result, error = None, traceback.format_exc()
    queue.put((result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, error))


def isolated(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """Run fn in a fresh process; return its result and that process's peak RSS in MiB."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    while True:
        try:
            result, peak, error = queue.get(timeout=5)
            break
        except Empty:
            if not proc.is_alive() and queue.empty():  # killed (e.g. out of memory) before it could report
                raise RuntimeError(f"{fn.__name__}: its subprocess died without a result (exit {proc.exitcode})") from None
    proc.join()
    if error is not None:
        raise RuntimeError(f"{fn.__name__} failed in its subprocess:\n{error}")
    return result, peak


def write_section(title: str, body: str) -> None:
    """Replace (or append) the `## title` section of docs/BENCHMARKS.md."""
    benchmarks = docs_dir() / "BENCHMARKS.md"
    text = benchmarks.read_text() if benchmarks.exists() else "# Benchmarks\n\nEvery figure is measured by a script in scripts/; each ratio is against a baseline measured in the same run.\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    _write(benchmarks, pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section)


def write_marked(doc: str, name: str, body: str) -> None:
    """Replace (or append) the block between `<!-- name:begin -->` and `<!-- name:end -->` of docs/`doc`."""
    path = docs_dir() / doc
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    _write(path, pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_raw(name: str, results: dict) -> None:
    (docs_dir() / "bench").mkdir(parents=True, exist_ok=True)
    (docs_dir() / "bench" / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")


def parse_args(parser: argparse.ArgumentParser, quick: dict) -> argparse.Namespace:
    """Parse a benchmark's arguments; --quick shrinks them to `quick` and writes to the scratch docs, not docs/."""
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes {quick}, to check the script runs")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(quick)
        use_quick_docs()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return args
