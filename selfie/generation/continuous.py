"""The `continuous` generation backend: transformers' continuous-batching engine with selfie's sampling.

The engine (`ContinuousBatchingManager`, what `model.generate_batch` runs) keeps up to `batch_size`
sequences in flight over a paged KV cache: a response that stops frees its slot at once for the next
request, where a static batch decodes until its longest response is done. It runs on CPU and GPU,
with eager or SDPA attention (flash attention on GPUs that have it).

The engine's own sampler draws every row of a step with one `torch.multinomial` from the global RNG,
so a row's tokens would depend on which requests share its steps. selfie replaces it: each (prompt, k)
request gets the same `torch.Generator` the static backend would use, and a per-request logits
processor draws its token with `selfie.generation.sampler.draw` and leaves only that token possible, so the
engine's greedy pick returns it. A request's tokens therefore depend only on its seed and its logits,
as in the static backend; the logits themselves differ from a static batch's by float rounding only
(another batch layout), which can flip a draw whose uniform falls on a token boundary.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)

from selfie.errors import SelfieError
from selfie.generation.sampler import Item, Response, Samples, SamplingSettings, draw
from selfie.models import unwrap_peft

PAGE_SIZE = 64  # tokens per cache page: small pages waste little on short responses
# Without flash attention the engine attends each query over the whole batch's gathered KV under a mask. Through SDPA
# that sampled 353 new tokens/s on an H100 (1B model, 64 sequences in flight), through eager attention ("paged|eager",
# two plain matmuls) 1252 (scripts/dev/probe_gpu_generation.py, docs/BENCHMARKS.md). A model loaded with flash attention keeps it.
ENGINE_ATTENTION = "eager"


class SeededSampler(ContinuousBatchingLogitsProcessor):
    """Draws each request's next token from that request's own generator (`generators[request_id]`)."""

    supported_kwargs: dict[str, type] = {}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self, temperature: float, top_p: float):
        self.temperature, self.top_p = temperature, top_p
        self.generators: dict[str, torch.Generator] = {}
        self.rows: list[str] = []

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.zero_()

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        # Called for each forward pass, right before it, with the requests whose logits it returns, in row order.
        self.rows = [request.state.request_id for request in requests_with_new_token]
        return torch.zeros(len(self.rows), dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        # Rows past len(self.rows) belong to no request (the engine slices a fixed-size index); left as they are.
        n = len(self.rows)
        if not n:  # a pass of prompt chunks only: no request draws
            return scores
        tokens = draw(scores[:n], [self.generators[r] for r in self.rows], self.temperature, self.top_p)
        chosen = scores.clone()
        chosen[:n] = float("-inf")
        chosen[torch.arange(n, device=scores.device), tokens] = 0.0
        return chosen


class SeededProcessorList(ContinuousBatchingLogitsProcessorList):
    """The engine's logits-processor list holding only the seeded sampler (one argument row per request)."""

    def __init__(self, sampler: SeededSampler):
        super().__init__(LogitsProcessorList([sampler]))
        self.tensors_required = 1


def engine_config(prompts: list[list[int]], num_responses: int, max_new_tokens: int, batch_size: int) -> ContinuousBatchingConfig:
    """`batch_size` sequences in flight, room in the cache for all of them at full length, and per forward pass
    room for their decode tokens plus as many prompts' prefill as a static batch holds."""
    longest = max(len(p) for p in prompts)
    pages = math.ceil((longest + max_new_tokens) / PAGE_SIZE)
    return ContinuousBatchingConfig(
        page_size=PAGE_SIZE,
        num_blocks=batch_size * pages + 1,
        max_requests_per_batch=batch_size,
        max_batch_tokens=batch_size + longest * max(1, batch_size // num_responses),
        # selfie's sampler runs Python per step: no CUDA graph replay, no step overlapping it
        use_cuda_graph=False,
        use_async_batching=False,
        seed=0,
    )


def sample_continuous(model: PreTrainedModel, items: list[Item], s: SamplingSettings) -> Samples:
    """The backend: batch_size sequences in flight, the prompts' groups yielded as they complete."""
    rows = [row for _, row in items]
    for done in run_engine(model, [ids for ids, _ in items], s.generators(rows), s):
        yield [(rows[p], outs) for p, outs in done]


def run_engine(
    model: PreTrainedModel, prompts: list[list[int]], generators: list[list[torch.Generator]], s: SamplingSettings
) -> Iterator[list[tuple[int, list[Response]]]]:
    """Sample len(generators[p]) continuations of each prompt p; yield, as prompts complete, lists of
    (p, [(token ids without the stop token, finished)] in k order). Close the iterator to stop the engine early."""
    sampler = SeededSampler(s.temperature, s.top_p)
    max_new_tokens, stop_ids = s.max_new_tokens, s.stop_ids
    generation = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(stop_ids))
    engine = unwrap_peft(model)  # the transformers model the engine drives; a PEFT model's LoRA layers stay active in it
    device, attention = engine.device, engine.config._attn_implementation
    # The engine seeds the global RNG when it starts; fork it so the caller's random stream is left as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if attention == "sdpa":  # paged SDPA with the engine's [queries, whole batch's KV] mask is slow; see ENGINE_ATTENTION
            engine.set_attn_implementation(ENGINE_ATTENTION)
        try:
            manager = engine.init_continuous_batching(
                generation_config=generation,
                continuous_batching_config=engine_config(prompts, len(generators[0]), max_new_tokens, s.batch_size),
            )
            manager.logit_processor = SeededProcessorList(sampler)  # before start(): the batch processor is built from it
            # Every request is queued before the engine starts, so its first step takes them in one order and the
            # schedule (which requests share a forward pass) is the same on every run.
            for p, gens in enumerate(generators):
                for k, generator in enumerate(gens):
                    sampler.generators[f"{p}/{k}"] = generator
                    manager.add_request(
                        prompts[p], request_id=f"{p}/{k}", max_new_tokens=max_new_tokens, eos_token_id=sorted(stop_ids)
                    )
            manager.start()
            try:
                yield from _collect(manager, generators, stop_ids)
            finally:
                manager.stop(block=True, hard_stop=True)
                manager.destroy()
        finally:
            engine.set_attn_implementation(attention)


def _collect(manager, generators: list[list[torch.Generator]], stop_ids: set[int]) -> Iterator[list[tuple[int, list[Response]]]]:
    """Results as the engine finishes them, grouped into the prompts they complete."""
    outputs: dict[int, dict[int, Response]] = {p: {} for p in range(len(generators))}
    waiting = len(generators)
    while waiting:
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                raise SelfieError("generate: the continuous-batching engine stopped before every response was done")
            continue
        done = []
        while result is not None:  # take every result already there, so one write covers them
            if result.error is not None:
                raise SelfieError(f"generate: the continuous-batching engine failed: {result.error}")
            p, k = map(int, result.request_id.split("/"))
            tokens = list(result.generated_tokens)
            finished = bool(tokens) and tokens[-1] in stop_ids
            outputs[p][k] = (tokens[:-1] if finished else tokens, finished)
            if len(outputs[p]) == len(generators[p]):
                done.append((p, [outputs[p][k] for k in range(len(generators[p]))]))
            result = manager.get_result(timeout=0)
        if done:
            waiting -= len(done)
            yield done
