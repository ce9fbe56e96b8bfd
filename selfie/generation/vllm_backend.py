"""`generate.backend: vllm`: vLLM's engine, run in a worker process from vLLM's own Python environment.

vLLM pins transformers versions selfie does not run with, so it lives in an environment of its own (as the SPA
reference code and RLHFlow keep it): `$SELFIE_VLLM_PYTHON` names its interpreter (`make vllm-env` builds one),
else the current interpreter is used when it imports vllm. Each stage starts a fresh worker
(selfie/generation/vllm_worker.py) on pi_init's directory with the previous adapter as a `LoRARequest`; the worker exits when
the stage's prompts are done, which frees the engine's memory before training. Prompts go in as selfie's chat
token ids, responses come back as token ids, stop ids are selfie's: the judge and trainer see the same tokens.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import torch
from transformers import GenerationConfig, PretrainedConfig

from selfie.config.schema import GenerateConfig, ModelConfig
from selfie.errors import SelfieError
from selfie.generation.sampler import Item, Response, Samples, SamplingSettings
from selfie.io import TMP_SUFFIX, read_json
from selfie.models import (
    cache_dir,
    hub_options,
    load_generation_config,
    load_model_config,
    load_policy,
    merge_adapter,
    model_settings,
    resolve_dtype,
    resolve_model_path,
)

logger = logging.getLogger(__name__)

PYTHON_ENV = "SELFIE_VLLM_PYTHON"
WORKER = Path(__file__).with_name("vllm_worker.py")
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values
GPU_HEADROOM = 0.9  # of the GPU memory free at start: vLLM refuses to start above what is free
# Variables of the launcher's process group: a worker that saw them would try to join the trainers' world.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


@dataclasses.dataclass
class VllmPolicy:
    """What the vLLM worker samples from: pi_init's directory (or hub id), an adapter on it, and where."""

    model: str
    adapter: Path | None
    dtype: str  # model.dtype, resolved: float32 | bfloat16 | float16
    settings: ModelConfig  # the recipe's model: section (its revision and trust_remote_code reach vLLM)
    config: PretrainedConfig
    generation_config: GenerationConfig | None
    device: torch.device
    max_num_seqs: int | None = None  # generate.max_num_seqs
    gpu_memory_utilization: float | None = None  # generate.gpu_memory_utilization

    @property
    def max_position_embeddings(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None)


def vllm_policy(
    name: str, adapter: str | Path | None, settings: str | ModelConfig, device: torch.device, engine: GenerateConfig | None = None
) -> VllmPolicy:
    """The worker's policy: `name` resolved to what vLLM reads (a built-in model's safetensors cache), loaded as
    `settings` (a dtype or the recipe's model: section) says, no weights loaded here; the engine sized as `engine`
    (the recipe's generate: section) says."""
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise SelfieError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json)")
    settings = model_settings(settings)
    if settings.quantized:  # vLLM's bitsandbytes loading is GPU-only and untested here: say what is sampled from
        logger.warning(
            "generate.backend vllm samples from the unquantised weights of %s (model.load_in_4bit / 8bit apply to selfie's own loads)",
            name,
        )
    return VllmPolicy(
        model=resolve_model_path(name),
        adapter=Path(adapter) if adapter is not None else None,
        dtype=str(resolve_dtype(settings.dtype)).removeprefix("torch."),
        settings=settings,
        config=load_model_config(name, settings),
        generation_config=load_generation_config(name),
        device=torch.device(device),
        max_num_seqs=engine.max_num_seqs if engine else None,
        gpu_memory_utilization=engine.gpu_memory_utilization if engine else None,
    )


def interpreter() -> str:
    """The Python of vLLM's environment: $SELFIE_VLLM_PYTHON, else the one `make vllm-env` builds in selfie's cache,
    else this one if it imports vllm; one line saying how to get one when there is none."""
    configured = os.environ.get(PYTHON_ENV)
    if configured:
        if not Path(configured).is_file():
            raise SelfieError(f"generate.backend vllm: {PYTHON_ENV}={configured} is not a file")
        return configured
    built = cache_dir() / "vllm-env" / "bin" / "python"
    if built.is_file():
        return str(built)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise SelfieError(
        f"generate.backend vllm: vLLM is not installed; `make vllm-env` builds its environment in {built.parent.parent} "
        f"(or set {PYTHON_ENV} to the python of one)"
    )


@cache
def version(python: str) -> str:
    """vLLM's version in that environment (checked once per process: importing vllm takes seconds)."""
    done = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SelfieError(f"generate.backend vllm: {python} cannot import vllm ({last[:200]})")
    return done.stdout.strip().splitlines()[-1]


def sampler_name(python: str) -> str:
    """What responses.jsonl rows record as their sampler (rows without one came from selfie's own)."""
    return f"vllm {version(python)}"


def lora_rank(adapter: Path) -> int:
    """vLLM's max_lora_rank for this adapter: its largest rank, rounded up to a value vLLM allows."""
    config = read_json(adapter / "adapter_config.json")
    rank = max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()])
    return next((allowed for allowed in LORA_RANKS if allowed >= rank), rank)


def kv_cache_bytes(config: PretrainedConfig, dtype: str, sequences: int, max_model_len: int) -> int:
    """KV cache for `sequences` of `max_model_len` tokens (CPU: vLLM would otherwise reserve a share of all memory)."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    per_token = 2 * text.num_hidden_layers * (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    per_token *= torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return math.ceil(1.2 * per_token * sequences * max_model_len) + (64 << 20)


def engine_settings(policy: VllmPolicy, batch_size: int, max_model_len: int) -> dict:
    """The engine's sizes: on a GPU generate.max_num_seqs (None: vLLM's default) and generate.gpu_memory_utilization
    (None: a share of the memory free now); on CPU the KV cache bytes for max_num_seqs (None: `batch_size`) sequences.
    `gpu_free_mib` records what the engine found free at its start."""
    on_gpu = policy.device.type == "cuda"
    sequences = policy.max_num_seqs or (None if on_gpu else batch_size)
    settings = {
        "dtype": policy.dtype,
        "max_model_len": max_model_len,
        "max_num_seqs": sequences,
        "max_lora_rank": lora_rank(policy.adapter) if policy.adapter else None,
        # CPU: no torch.compile warm-up (minutes on 2 cores, for a few per cent); GPUs keep vLLM's CUDA graphs
        "enforce_eager": not on_gpu,
    }
    if on_gpu:
        free, total = torch.cuda.mem_get_info(policy.device)
        share = policy.gpu_memory_utilization or GPU_HEADROOM * free / total
        settings.update(gpu_memory_utilization=round(share, 4), gpu_free_mib=free >> 20, gpu_total_mib=total >> 20)
    elif "VLLM_CPU_KVCACHE_SPACE" not in os.environ:  # the user's own size wins
        settings["kv_cache_bytes"] = kv_cache_bytes(policy.config, policy.dtype, sequences, max_model_len)
    return settings


def worker_environment(device: torch.device, shard: tuple[int, int]) -> dict[str, str]:
    """The worker's variables: its own device, none of the launcher's process group, one engine process."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in the worker itself: one process to stop
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if device.type == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        env["CUDA_VISIBLE_DEVICES"] = ids[device.index or 0]
    else:  # each rank's engine on its own cores, none held back (vLLM reserves one by default)
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        cores = sorted(os.sched_getaffinity(0))
        rank, world = int(os.environ.get("LOCAL_RANK", shard[0])), int(os.environ.get("LOCAL_WORLD_SIZE", shard[1]))
        mine = cores[rank::world] if world <= len(cores) else cores
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, mine)))
        env.setdefault("OMP_NUM_THREADS", str(len(mine)))
    return env


def _die_with_parent() -> None:
    """In the worker, before exec: a SIGKILLed selfie takes its worker (and the engine's memory) with it."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Worker:
    """One vLLM worker process: `lines()` yields what it writes, the process is stopped when they are closed."""

    def __init__(self, python: str, request: dict, env: dict[str, str], output: Path):
        # beside the output, named as temporaries are (`.<name>...tmp`): a killed run's are removed on resume
        self.log = output.with_name(f".{output.name}.vllm-log.tmp")
        self._request = output.with_name(f".{output.name}.vllm-request.tmp")
        self._request.write_text(json.dumps(request), encoding="utf-8")
        read, write = os.pipe()
        self.started = time.perf_counter()
        with open(self.log, "w") as log_file:
            self.process = subprocess.Popen(
                [python, str(WORKER), str(self._request), str(write)],
                pass_fds=(write,),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        os.close(write)
        self._lines = os.fdopen(read, encoding="utf-8")

    def lines(self) -> Iterator[dict]:
        try:
            for text in self._lines:
                yield json.loads(text)
        finally:
            self.stop()

    def failure(self) -> str:
        """The worker's own last words, for an error line (its log file keeps the rest)."""
        self.process.wait()
        tail = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()][-1:]
        return f"worker exited with {self.process.returncode}" + (f": {tail[0][:300]}" if tail else "")

    def finish(self) -> None:
        """After `done`: the log is no longer needed."""
        self.stop()
        self.log.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._lines.close()
        self._request.unlink(missing_ok=True)


def run_worker(policy: VllmPolicy, request: dict, output: Path, shard: tuple[int, int]) -> Iterator[dict]:
    """Start a worker and yield its lines up to `done`; an engine error is one SelfieError line naming its log."""
    worker = Worker(interpreter(), request, worker_environment(policy.device, shard), output)
    lines = worker.lines()
    try:
        for line in lines:
            if line.get("event") == "error":
                raise WorkerError(line["kind"], f"{line['message']} (log: {worker.log})")
            if line.get("event") == "done":
                worker.finish()
                return
            if line.get("event") == "ready":  # interpreter, imports and engine: what a stage pays before sampling
                line["worker_start_seconds"] = round(time.perf_counter() - worker.started, 3)
            yield line
        raise WorkerError("engine", f"{worker.failure()} (log: {worker.log})")
    finally:
        lines.close()


class WorkerError(SelfieError):
    def __init__(self, kind: str, message: str):
        super().__init__(f"generate.backend vllm: {message}")
        self.kind = kind  # "adapter": vLLM refused the LoRA adapter; "engine": anything else


def merged_copy(policy: VllmPolicy, directory: Path) -> VllmPolicy:
    """pi_init with the adapter merged in, saved at `directory`: for an adapter vLLM refuses to load."""
    model, tokenizer = load_policy(policy.model, policy.adapter, policy.settings.unquantised(policy.dtype))
    merge_adapter(model).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return dataclasses.replace(policy, model=str(directory), adapter=None, settings=ModelConfig(dtype=policy.dtype))


def sample_vllm(
    policy: VllmPolicy, items: list[Item], s: SamplingSettings, output: Path, shard: tuple[int, int], info: dict
) -> Samples:
    """Samples (selfie/generation/sampler.py) from vLLM: one group per prompt, as its K responses complete.

    A response is (token ids without the stop token, finished): finish reason `stop` is finished, `length` was cut at
    max_new_tokens, any other is an error. The adapter goes in as a LoRARequest; where vLLM refuses it, a merged copy
    of the model is sampled instead, and the log and `info` say so. `info` gets the engine's version and start-up time.
    """
    if not items:
        return
    max_model_len = check_model_length(policy, max(len(ids) for ids, _ in items), s.max_new_tokens)
    request = {"sampling": sampling_request(s), "prompts": prompts_request(items, s)}
    rows = {row["prompt_id"]: row for _, row in items}
    attempt, merged = policy, None
    try:
        while True:
            request.update(
                model=attempt.model,
                model_options=hub_options(attempt.settings),
                adapter=str(attempt.adapter) if attempt.adapter else None,
            )
            request["engine"] = engine_settings(attempt, s.batch_size, max_model_len)
            # what a GPU engine saw free at its start: the memory earlier stages left behind
            info.update({k: v for k, v in request["engine"].items() if k.startswith("gpu_")})
            try:
                yield from _groups(run_worker(attempt, request, output, shard), rows, s.stop_ids, info)
                return
            except WorkerError as e:
                if e.kind != "adapter" or merged is not None:
                    raise
                merged = Path(tempfile.mkdtemp(prefix=f".{output.name}.vllm-merged.", suffix=TMP_SUFFIX, dir=output.parent))
                logger.warning("%s; sampling from a copy of the model with the adapter merged in", e)
                info["vllm_merged_adapter"] = True
                attempt = merged_copy(policy, merged)
    finally:
        if merged is not None:
            shutil.rmtree(merged, ignore_errors=True)


def check_model_length(policy: VllmPolicy, longest: int, max_new_tokens: int) -> int:
    """The engine's max_model_len: the longest prompt + max_new_tokens, which the model's positions must hold."""
    needed, limit = longest + max_new_tokens, policy.max_position_embeddings
    if limit and needed > limit:
        raise SelfieError(
            f"generate.backend vllm: the longest prompt ({longest} tokens) + generate.max_new_tokens ({max_new_tokens}) "
            f"exceed the model's {limit} positions"
        )
    return needed


def sampling_request(s: SamplingSettings) -> dict:
    return {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_new_tokens, "stop_ids": sorted(s.stop_ids)}


def prompts_request(items: list[Item], s: SamplingSettings) -> list[dict]:
    """Every prompt's token ids and its K responses' seeds: selfie's own (run seed, prompt_id, k) seeds."""
    return [{"key": row["prompt_id"], "ids": ids, "seeds": s.seeds(row["prompt_id"])} for ids, row in items]


FINISHED = {"stop": True, "length": False}  # vLLM's finish reason -> selfie's `finished`


def _groups(lines: Iterator[dict], rows: dict[str, dict], stop_ids: set[int], info: dict) -> Samples:
    for line in lines:
        if line.get("event") == "ready":
            logger.info("vLLM %s worker ready in %.1f s", line["vllm"], line["worker_start_seconds"])
            info.update(
                vllm_version=line["vllm"],
                engine_startup_seconds=line["startup_seconds"],
                worker_start_seconds=line["worker_start_seconds"],
                vllm_max_num_seqs=line["max_num_seqs"],
            )
            continue
        outs: list[Response] = []
        for ids, reason in line["outputs"]:
            if reason not in FINISHED:
                raise SelfieError(f"generate.backend vllm: prompt {line['key']}: vLLM ended a response with '{reason}'")
            stopped = FINISHED[reason] and bool(ids) and ids[-1] in stop_ids
            outs.append((ids[:-1] if stopped else ids, FINISHED[reason]))
        yield [(rows[line["key"]], outs)]
