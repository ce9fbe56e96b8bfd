"""Shared pieces of the scripts in benchmarks/, dev/ and quality/: machine line, matmul and copy ceilings, benchmark
models, isolated runs, docs/BENCHMARKS.md sections."""

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
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent  # the repository: the scripts run from here, as modules
DOCS = ROOT / "docs"
QUICK_DOCS = Path(tempfile.gettempdir()) / "selfie-bench-quick"


def docs_dir() -> Path:
    """docs/, or $SELFIE_BENCH_DOCS: where --quick runs write, so a smoke run never replaces a measurement."""
    return Path(os.environ.get("SELFIE_BENCH_DOCS", DOCS))


def use_quick_docs() -> Path:
    """Send this process's (and its children's) sections and raw results to QUICK_DOCS unless already redirected."""
    return Path(os.environ.setdefault("SELFIE_BENCH_DOCS", str(QUICK_DOCS)))


def machine() -> str:
    return (
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, {'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}"
    )


def device() -> str:
    """Where the benchmarks run: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def on_gpu() -> bool:
    return device() == "cuda"


def _best_seconds(fn: Callable[[], Any], repeats: int, tries: int) -> float:
    """Fastest of `tries` timings of `repeats` calls (the machine may be shared: the least disturbed is the ceiling)."""
    fn()
    best = float("inf")
    for _ in range(tries):
        if on_gpu():
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if on_gpu():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_gflops(dtype: torch.dtype = torch.float32, n: int | None = None, repeats: int = 10, tries: int = 3) -> float:
    """This machine's matmul throughput in `dtype` (on the GPU when there is one): the ceiling the compute figures
    are a fraction of."""
    n = n or (8192 if on_gpu() else 1024)
    a, b = (torch.randn(n, n, device=device()).to(dtype) for _ in range(2))
    return 2 * n**3 * repeats / _best_seconds(lambda: a @ b, repeats, tries) / 1e9


def copy_gbps(mib: int | None = None, repeats: int = 5, tries: int = 3) -> float:
    """This machine's memory bandwidth: a copy between two buffers far larger than any cache, bytes read plus bytes
    written per second (GB/s), the ceiling a decode step reading its weights and KV cache is held to."""
    mib = mib or (2048 if on_gpu() else 512)
    src = torch.ones(mib * 2**20 // 4, device=device())
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 * repeats / _best_seconds(lambda: dst.copy_(src), repeats, tries) / 1e9


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def import_floor(*modules: str) -> dict:
    """Import the modules and nothing else: run isolated, its peak RSS is the floor every method pays."""
    for module in modules:
        importlib.import_module(module)
    return {}


def random_lora(model_name: str, seed: int = 0, dtype: str = "float32"):
    """The model with a fresh LoRA adapter (selfie's defaults, no dropout) whose B matrices are random, so the
    adapter changes the model (a fresh one is the identity)."""
    from selfie.config.schema import LoraConfig
    from selfie.models import attach_lora, load_model

    torch.manual_seed(seed)
    policy = attach_lora(load_model(model_name, dtype), LoraConfig(dropout=0.0))
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return policy


# ---- benchmark models ------------------------------------------------------------------------------

# Random-weight models of a real size, built once on the machine (no weights travel): Llama architecture,
# the built-in model's tokenizer and chat template. 1b: 1.1B parameters (Llama 3.2 1B's shape, a 49k vocabulary).
RANDOM_MODELS = {
    "random-llama-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8
    )
}
# the model whose tokenizer they take: a name or directory; a machine without the built-in model names a copy of its files
TOKENIZER_FROM = os.environ.get("SELFIE_BENCH_TOKENIZER", "smollm2-135m")


def bench_model(name: str) -> str:
    """What the scripts hand selfie's loaders for --model: a random model's directory (built on first use, bf16),
    any other name as it is."""
    if name not in RANDOM_MODELS:
        return name
    target = Path(tempfile.gettempdir()) / "selfie-bench-models" / name
    if not (target / "config.json").is_file():
        from transformers import LlamaConfig, LlamaForCausalLM

        from selfie.io import atomic_directory
        from selfie.models import load_generation_config, load_tokenizer

        tokenizer = load_tokenizer(TOKENIZER_FROM)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **RANDOM_MODELS[name],
        )
        torch.manual_seed(0)
        with torch.device(device()):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            load_generation_config(TOKENIZER_FROM).save_pretrained(tmp)
    return str(target)


def model_label(name: str) -> str:
    """How a section names the benchmark's model."""
    if name not in RANDOM_MODELS:
        return name
    shape = RANDOM_MODELS[name]
    return (
        f"{name} (random weights: Llama architecture, hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
        f"{shape['num_attention_heads']} heads / {shape['num_key_value_heads']} KV heads, the built-in model's tokenizer)"
    )


def end_responses_after(
    model: torch.nn.Module, stop_id: int, mean_tokens: int, calibration: torch.Tensor, temperature: float
) -> None:
    """A random model almost never samples its stop token, so every response would run to the limit and every
    batch would finish together. A bias on the stop token's logit (set from one forward pass over `calibration`)
    makes each sampled token a stop with probability 1 / mean_tokens: lengths vary as real responses' do."""
    head = model.get_output_embeddings()
    with torch.no_grad():
        logits = model(calibration.to(head.weight.device)).logits[0].float() / temperature
        others = torch.cat([logits[:, :stop_id], logits[:, stop_id + 1 :]], dim=1).logsumexp(-1)
        # p = e^(l_stop + b) / (e^others + e^(l_stop + b)) = 1 / mean  <=>  l_stop + b = others - log(mean - 1)
        bias = (others - torch.log(torch.tensor(mean_tokens - 1.0)) - logits[:, stop_id]).median().item() * temperature
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True, device=head.weight.device, dtype=head.weight.dtype)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[stop_id] = bias
    model.set_output_embeddings(biased)


def peak_memory_label() -> str:
    return "peak GPU memory MiB (torch max allocated)" if on_gpu() else "peak RSS MiB"


def _child(fn: Callable, args: tuple, queue: mp.Queue) -> None:
    try:
        result, error = fn(*args), None
    except BaseException:  # reported to the parent, which would otherwise wait for a result forever
        result, error = None, traceback.format_exc()
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None
    queue.put((result, gpu if gpu is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, error))


def isolated(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """Run fn in a fresh process; return its result and that process's peak memory in MiB: GPU memory (torch's
    maximum allocated) when it used the GPU, else its peak RSS."""
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
    text = (
        benchmarks.read_text()
        if benchmarks.exists()
        else "# Benchmarks\n\nEvery figure is measured by a script in scripts/; each ratio is against a baseline measured in the same run.\n"
    )
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


def raw_name(name: str) -> str:
    """docs/bench/<name>.json on CPU, <name>-gpu.json on a GPU: the two measurements live side by side."""
    return f"{name}-gpu" if on_gpu() else name


def save_raw(name: str, results: dict) -> None:
    (docs_dir() / "bench").mkdir(parents=True, exist_ok=True)
    (docs_dir() / "bench" / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")


def section_title(title: str, raw: dict) -> str:
    """A GPU measurement gets its own section, named after the device, beside the CPU one."""
    return f"{title} on {raw['device_name']}" if raw.get("device_name") else title


def device_fields() -> dict:
    """The raw-result fields every script records about where it ran."""
    return {"machine": machine(), "device_name": torch.cuda.get_device_name() if on_gpu() else None}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model and --dtype: the built-in model in float32 on CPU; on a GPU e.g. random-llama-1b in bfloat16."""
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="a selfie model name, or one of " + ", ".join(RANDOM_MODELS) + " (random weights, built on the machine)",
    )
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))


def parse_args(parser: argparse.ArgumentParser, quick: dict) -> argparse.Namespace:
    """Parse a benchmark's arguments; --quick shrinks them to `quick` and writes to the scratch docs, not docs/.
    --render JSON writes the section from a saved raw result (e.g. one measured on another machine) without measuring."""
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes {quick}, to check the script runs")
    parser.add_argument("--render", metavar="JSON", default=None, help="write the section from this raw result, measure nothing")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(quick)
        use_quick_docs()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return args


def measure_or_load(args: argparse.Namespace, name: str, measure: Callable[[argparse.Namespace], dict]) -> dict:
    """The raw result: read from --render, or measured now and saved to docs/bench/ (see raw_name)."""
    if args.render:
        return json.loads(Path(args.render).read_text())
    command = " ".join(["python", "-m", sys.modules["__main__"].__spec__.name, *sys.argv[1:]])
    raw = {**device_fields(), "command": command, "quick": args.quick, **measure(args)}
    save_raw(raw_name(name), raw)
    return raw
