"""Sample K responses per prompt from the current policy (docs/METHOD.md section 1.3).

Every (prompt, k) row draws its tokens from its own `torch.Generator`, seeded from (run seed,
prompt_id, k), through `draw`, so a prompt's responses do not depend on the batch size, the batch
order or which other prompts share its batch (HF generate shares one RNG across the batch). Two
backends run the model: `static`, a small loop over length-sorted batches (below), and `continuous`,
transformers' continuous-batching engine (selfie/generation/continuous.py); `auto` measures both on the first
prompts and keeps the faster. Rows are written as their prompts complete, so a killed run resumes
where it stopped; the final responses.jsonl is sorted by prompt_id and written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfie.cli.flags import add_options, from_args
from selfie.config.schema import GenerateConfig, ModelConfig, RecipeConfig
from selfie.data import check_prompt_rows, select_shard
from selfie.errors import SelfieError
from selfie.generation import vllm_backend
from selfie.generation.vllm_backend import VllmPolicy, vllm_policy
from selfie.io import ResumableJsonl, atomic_write_jsonl, check_writable, read_jsonl
from selfie.models import add_policy_args, load_policy, load_tokenizer, model_settings
from selfie.tokens import chat_ids, pad_token_id, stop_token_ids

logger = logging.getLogger(__name__)


def row_seed(seed: int, prompt_id: str, k: int) -> int:
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}\x00{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def draw(logits: torch.Tensor, generators: list[torch.Generator], temperature: float, top_p: float) -> torch.Tensor:
    """One next token per row, each from its own generator."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # tokens after the nucleus; the top token always stays
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    # Inverse CDF with one uniform per row from that row's generator (30x faster than torch.multinomial per row).
    cdf = probs.double().cumsum(-1)
    u = torch.cat([torch.rand(1, generator=g, device=g.device, dtype=torch.float64) for g in generators])
    return torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


@torch.inference_mode()
def sample_batch(
    model: PreTrainedModel, prompts: list[list[int]], generators: list[list[torch.Generator]], s: Sampling
) -> list[list[tuple[list[int], bool]]]:
    """Sample len(generators[p]) continuations of each prompt p; returns (token ids without the stop token, finished).

    The prompts are prefilled once (left padded) and their KV cache repeated for their K rows; rows
    that stop leave the batch so the rest decode faster.
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), s.pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    repeats = torch.tensor([len(g) for g in generators])
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    index = torch.repeat_interleave(torch.arange(len(prompts)), repeats).to(device)
    cache.batch_select_indices(index)
    logits, mask, positions = out.logits[index, -1], mask[index], positions[index, -1:]

    rows_gen = [g for gens in generators for g in gens]
    tokens: list[list[int]] = [[] for _ in rows_gen]
    finished = [False] * len(rows_gen)
    active = list(range(len(rows_gen)))  # batch position j holds row active[j]
    for step in range(s.max_new_tokens):
        drawn = draw(logits.float(), [rows_gen[r] for r in active], s.temperature, s.top_p).tolist()
        keep = []
        for j, (row, token) in enumerate(zip(active, drawn)):
            if token in s.stop_ids:
                finished[row] = True
            else:
                tokens[row].append(token)
                keep.append(j)
        if not keep or step == s.max_new_tokens - 1:
            break
        if len(keep) < len(active):
            select = torch.tensor(keep, device=device)
            cache.batch_select_indices(select)
            mask, positions = mask[select], positions[select]
            active = [active[j] for j in keep]
            drawn = [drawn[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        positions = positions + 1
        next_ids = torch.tensor(drawn, device=device).unsqueeze(1)
        out = model(input_ids=next_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1]

    results, r = [], 0
    for gens in generators:
        results.append([(tokens[r + k], finished[r + k]) for k in range(len(gens))])
        r += len(gens)
    return results


PROBE_BATCHES = 2  # auto: each backend samples this many static batches of prompts before the choice


@dataclasses.dataclass
class Sampling:
    """What every backend samples with."""

    num_responses: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    batch_size: int  # sequences decoded together
    stop_ids: set[int]
    pad_id: int
    device: torch.device

    def seeds(self, prompt_id: str) -> list[int]:
        """The seed of each of a prompt's K responses."""
        return [row_seed(self.seed, prompt_id, k) for k in range(self.num_responses)]

    def generators(self, rows: Sequence[dict]) -> list[list[torch.Generator]]:
        return [[torch.Generator(self.device).manual_seed(seed) for seed in self.seeds(row["prompt_id"])] for row in rows]

    @property
    def prompts_per_batch(self) -> int:
        return max(1, self.batch_size // self.num_responses)


Item = tuple[list[int], dict]  # (prompt token ids, prompt row)
Samples = Iterator[list[tuple[dict, list[tuple[list[int], bool]]]]]  # groups of (prompt row, its K (tokens, finished))


def sample_static(model: PreTrainedModel, items: list[Item], s: Sampling) -> Samples:
    """Batches of batch_size // K prompts, shortest prompts first (a batch holds prompts of similar length)."""
    items = sorted(items, key=lambda e: (len(e[0]), e[1]["prompt_id"]))
    for b in range(0, len(items), s.prompts_per_batch):
        chunk = items[b : b + s.prompts_per_batch]
        rows = [row for _, row in chunk]
        yield list(zip(rows, sample_batch(model, [ids for ids, _ in chunk], s.generators(rows), s)))


def sample_engine(model: PreTrainedModel, items: list[Item], s: Sampling) -> Samples:
    """transformers' continuous-batching engine, batch_size sequences in flight (selfie/generation/continuous.py)."""
    from selfie.generation.continuous import sample_continuous

    rows = [row for _, row in items]
    for done in sample_continuous(model, [ids for ids, _ in items], s.generators(rows), s):
        yield [(rows[p], outs) for p, outs in done]


SAMPLERS = {"static": sample_static, "continuous": sample_engine}  # selfie's own sampler: `auto` chooses between them
BACKENDS = ("auto", *SAMPLERS, "vllm")
SELFIE_SAMPLER = "selfie's own sampler (static | continuous)"


def load_generator(
    name: str, adapter: str | Path | None, settings: str | ModelConfig, backend: str, device: str | torch.device
) -> tuple[PreTrainedModel | VllmPolicy, PreTrainedTokenizerBase]:
    """What `generate_responses` samples from: pi_init + adapter on `device` (loaded as `settings`, a dtype or the
    recipe's model: section, says), or, for vLLM, what its worker loads (no weights in this process)."""
    if backend == "vllm":
        return vllm_policy(name, adapter, settings, torch.device(device)), load_tokenizer(name, model_settings(settings))
    return load_policy(name, adapter, settings, device=device)


def generate_responses(
    model: PreTrainedModel | VllmPolicy,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[dict],
    output: str | Path,
    *,
    num_responses: int = GenerateConfig.num_responses,
    max_new_tokens: int = GenerateConfig.max_new_tokens,
    temperature: float = GenerateConfig.temperature,
    top_p: float = GenerateConfig.top_p,
    seed: int = RecipeConfig.seed,
    batch_size: int = GenerateConfig.batch_size,
    shard: tuple[int, int] = (0, 1),
    backend: str = GenerateConfig.backend,
) -> dict:
    """Write responses.jsonl rows {prompt_id, prompt, responses, finished} for this shard's prompts; return metrics.

    `batch_size` counts sequences decoded together (prompts x num_responses); `backend` is one of BACKENDS (`vllm`
    takes the VllmPolicy of `load_generator`). A rerun after an interruption continues from `<output>.partial` and
    skips the prompts already done, if they were sampled by the same sampler (selfie's own, or vLLM's).
    """
    if num_responses < 1 or max_new_tokens < 1 or batch_size < 1:
        raise SelfieError("generate: num_responses, max_new_tokens and batch_size must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise SelfieError(f"generate: need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    if backend not in BACKENDS:
        raise SelfieError(f"generate: unknown backend '{backend}' ({', '.join(BACKENDS)})")
    check_prompt_rows(prompts, "prompts")
    mine = select_shard(prompts, shard)
    output = Path(output)
    writer = ResumableJsonl(output)
    todo = [row for row in mine if row["prompt_id"] not in writer.done_keys]
    sampler = vllm_backend.sampler_name(vllm_backend.interpreter()) if backend == "vllm" else None
    if len(todo) < len(mine):
        check_same_sampler(writer, sampler)
        logger.info("resuming %s: %d of %d prompts already done", output, len(mine) - len(todo), len(mine))

    items = [(chat_ids(tokenizer, row["prompt"], True), row) for row in todo]
    s = Sampling(
        num_responses,
        max_new_tokens,
        temperature,
        top_p,
        seed,
        batch_size,
        stop_token_ids(model, tokenizer),
        pad_token_id(tokenizer),
        model.device,
    )
    samplers = dict(SAMPLERS)
    engine: dict = {}  # what the vLLM engine reports: its version, start-up seconds
    if backend == "vllm":
        samplers["vllm"] = lambda policy, todo, s: vllm_backend.sample_vllm(policy, todo, s, output, shard, engine)
    else:
        model.eval()
    done: set[str] = set()
    new_tokens, start, metrics = 0, time.perf_counter(), {}
    try:
        with tqdm(total=len(items), desc="generate", unit="prompt", disable=None) as bar:

            def write(samples: Samples) -> int:
                """Write each group of finished prompts as it comes; the new tokens written."""
                tokens = 0
                with contextlib.closing(samples):  # an error here stops a continuous engine's thread too
                    for group in samples:
                        tokens += sum(len(t) + stopped for _, outs in group for t, stopped in outs)  # stop token counts
                        writer.append(
                            [
                                {
                                    "prompt_id": row["prompt_id"],
                                    "prompt": row["prompt"],
                                    "responses": [tokenizer.decode(t, skip_special_tokens=True) for t, _ in outs],
                                    "finished": [stopped for _, stopped in outs],
                                    **({"sampler": sampler} if sampler else {}),
                                }
                                for row, outs in group
                            ]
                        )
                        done.update(row["prompt_id"] for row, _ in group)
                        bar.update(len(group))
                return tokens

            if backend == "auto":
                backend, metrics = choose_backend(model, items, s, write)
                new_tokens += metrics.pop("probe_tokens")
            new_tokens += write(samplers[backend](model, [i for i in items if i[1]["prompt_id"] not in done], s))
    finally:
        writer.close()
    seconds = time.perf_counter() - start

    wanted = {row["prompt_id"] for row in mine}
    rows = sorted((row for row in read_jsonl(writer.partial) if row["prompt_id"] in wanted), key=lambda r: r["prompt_id"])
    atomic_write_jsonl(output, rows)
    writer.partial.unlink()
    finished = [f for row in rows for f in row["finished"]]
    metrics = {
        "prompts": len(rows),
        "responses": len(finished),
        "finished_fraction": sum(finished) / len(finished) if finished else None,
        "new_tokens": new_tokens,
        "seconds": round(seconds, 3),
        "tokens_per_second": new_tokens / seconds if seconds else None,
        "backend": backend,
        **metrics,
        **engine,
    }
    logger.info(
        "generated %d responses for %d prompts (%.1f tokens/s, %s backend) -> %s",
        len(finished),
        len(rows),
        metrics["tokens_per_second"] or 0.0,
        backend,
        output,
    )
    return metrics


def check_same_sampler(writer: ResumableJsonl, sampler: str | None) -> None:
    """Refuse to continue rows another sampler wrote: vLLM's sampler draws other tokens than selfie's for the same
    seeds, so a stage's responses come from one of them (rows without a `sampler` key are selfie's own)."""
    earlier = {row.get("sampler") or SELFIE_SAMPLER for row in read_jsonl(writer.partial)}
    if earlier != {sampler or SELFIE_SAMPLER}:
        raise SelfieError(
            f"{writer.partial}: these responses were sampled by {', '.join(sorted(earlier))}; resuming them with "
            f"{sampler or SELFIE_SAMPLER} would mix samplers (use the same generate.backend, or delete the .partial file)"
        )


def choose_backend(model: PreTrainedModel, items: list[Item], s: Sampling, write: Callable[[Samples], int]) -> tuple[str, dict]:
    """`auto`: the static and the continuous backend each sample (and write) PROBE_BATCHES static batches' worth of
    prompts; the faster in new tokens/s samples the rest. Too few prompts to gain from a choice: static, no probe.
    Returns the backend and metrics (the probe rates, the probes' new tokens)."""
    probe = PROBE_BATCHES * s.prompts_per_batch
    if len(items) < 4 * probe:
        return "static", {"probe_tokens": 0}
    rates, tokens = {}, 0
    for i, name in enumerate(SAMPLERS):
        start = time.perf_counter()
        try:
            sampled = write(SAMPLERS[name](model, items[i * probe : (i + 1) * probe], s))
        except Exception as e:  # noqa: BLE001 - an engine that cannot run this model leaves the static backend
            logger.warning(
                "generate backend auto: %s failed (%s); using static",
                name,
                str(e).splitlines()[0] if str(e) else type(e).__name__,
            )
            return "static", {"probe_tokens": tokens}
        rates[name], tokens = sampled / (time.perf_counter() - start), tokens + sampled
    choice = max(rates, key=rates.get)
    logger.info(
        "generate backend auto on %s: %s new tokens/s -> %s",
        s.device,
        ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items()),
        choice,
    )
    return choice, {"probe_tokens": tokens, **{f"auto_{name}_tokens_per_second": rate for name, rate in rates.items()}}


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    add_policy_args(
        parser,
        model="hub id, local directory, .gguf file or built-in alias",
        adapter="PEFT adapter directory to sample from (default: the bare model)",
        adapter_required=False,
        reads=("--prompts", ".jsonl/.json/.parquet file, saved dataset dir, hub id or 'demo'"),
        writes="responses.jsonl to write",
    )
    # the recipe's generate: section, seed and model.dtype, with their defaults
    add_options(
        parser,
        GenerateConfig,
        [f.name for f in dataclasses.fields(GenerateConfig)],
        {
            "num_responses": "responses per prompt (K)",
            "temperature": "0 = greedy",
            "batch_size": "sequences decoded together",
            "backend": "static batches, transformers' continuous batching, auto (measure both, keep the faster), "
            "or vllm (vLLM's engine in its own environment: $SELFIE_VLLM_PYTHON)",
        },
    )
    add_options(parser, RecipeConfig, ["seed"])


def run_generate_command(args: argparse.Namespace) -> None:
    from selfie.data import load_prompts
    from selfie.run.lock import output_lock

    g = from_args(GenerateConfig, args)  # the cross-key checks of the recipe's section
    check_writable(args.output, directory=False)
    prompts = load_prompts(args.prompts)
    with output_lock(args.output):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_generator(args.model, args.adapter, args.dtype, g.backend, device)
        generate_responses(
            model,
            tokenizer,
            prompts,
            args.output,
            num_responses=g.num_responses,
            max_new_tokens=g.max_new_tokens,
            temperature=g.temperature,
            top_p=g.top_p,
            seed=args.seed,
            batch_size=g.batch_size,
            backend=g.backend,
        )
