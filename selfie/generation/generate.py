"""Sample K responses per prompt from the current policy (docs/METHOD.md section 1.3).

Every (prompt, k) row draws its tokens from its own generator (selfie/generation/sampler.py), so a prompt's responses
do not depend on the batch size, the batch order or which other prompts share its batch. Two backends run the model:
`static`, a small loop over length-sorted batches (selfie/generation/static.py), and `continuous`, transformers'
continuous-batching engine (selfie/generation/continuous.py); `auto` measures both on the first prompts and keeps the
faster; `vllm` runs vLLM's engine in its own environment (selfie/generation/vllm_backend.py). Rows are written as their
prompts complete, so a killed run resumes where it stopped; the final responses.jsonl is sorted by prompt_id and
written atomically.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfie.config.schema import GenerateConfig, ModelConfig, RecipeConfig
from selfie.data import check_prompt_rows, select_shard
from selfie.errors import SelfieError
from selfie.generation import vllm_backend
from selfie.generation.continuous import sample_continuous
from selfie.generation.sampler import Item, Response, Samples, SamplingSettings
from selfie.generation.static import sample_static
from selfie.generation.vllm_backend import VllmPolicy, vllm_policy
from selfie.io import ResumableJsonl, atomic_write_jsonl, read_jsonl
from selfie.models import load_policy, load_tokenizer, model_settings
from selfie.tokens import chat_ids, pad_token_id, stop_token_ids

logger = logging.getLogger(__name__)

PROBE_BATCHES = 2  # auto: each backend samples this many static batches of prompts before the choice
SAMPLERS = {"static": sample_static, "continuous": sample_continuous}  # selfie's own sampler: `auto` chooses between them
SELFIE_SAMPLER = "selfie's own sampler (static | continuous)"


def load_generator(
    name: str,
    adapter: str | Path | None,
    settings: str | ModelConfig,
    backend: str,
    device: str | torch.device,
    engine: GenerateConfig | None = None,
) -> tuple[PreTrainedModel | VllmPolicy, PreTrainedTokenizerBase]:
    """What `generate_responses` samples from: pi_init + adapter on `device` (loaded as `settings`, a dtype or the
    recipe's model: section, says), or, for vLLM, what its worker loads (no weights in this process), its engine
    sized as `engine` (the recipe's generate: section) says."""
    if backend == "vllm":
        policy = vllm_policy(name, adapter, settings, torch.device(device), engine)
        return policy, load_tokenizer(name, model_settings(settings))
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

    `batch_size` counts sequences decoded together (prompts x num_responses); `backend` is `auto`, a key of SAMPLERS,
    or `vllm` (which takes the VllmPolicy of `load_generator`). A rerun after an interruption continues from
    `<output>.partial` and skips the prompts already done, if they were sampled by the same sampler (selfie's own, or
    vLLM's).
    """
    settings = dict(num_responses=num_responses, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    check_settings(**settings, batch_size=batch_size, backend=backend)
    check_prompt_rows(prompts, "prompts")
    mine = select_shard(prompts, shard)
    output = Path(output)
    resumable = ResumableJsonl(output)
    sampler = vllm_backend.sampler_name(vllm_backend.interpreter()) if backend == "vllm" else None
    todo = rows_to_do(resumable, mine, sampler)
    items = [(chat_ids(tokenizer, row["prompt"], True), row) for row in todo]
    stop_ids, pad_id = stop_token_ids(model, tokenizer), pad_token_id(tokenizer)
    s = SamplingSettings(**settings, seed=seed, batch_size=batch_size, stop_ids=stop_ids, pad_id=pad_id, device=model.device)
    samplers, engine = SAMPLERS, {}  # engine: what the vLLM engine reports (its version, start-up seconds)
    if backend == "vllm":
        samplers = {"vllm": lambda policy, todo, s: vllm_backend.sample_vllm(policy, todo, s, output, shard, engine)}
    else:
        model.eval()
    start = time.perf_counter()
    try:
        with tqdm(total=len(items), desc="generate", unit="prompt", disable=None) as bar:
            write = RowWriter(resumable, tokenizer, sampler, bar)
            backend, new_tokens, metrics = sample_all(model, items, s, backend, samplers, write)
    finally:
        resumable.close()
    seconds = time.perf_counter() - start
    rows = final_rows(resumable, output, mine)
    metrics = {**rate_metrics(rows, new_tokens, seconds), "backend": backend, **metrics, **engine}
    logger.info(
        "generated %d responses for %d prompts (%.1f tokens/s, %s backend) -> %s",
        metrics["responses"],
        len(rows),
        metrics["tokens_per_second"] or 0.0,
        backend,
        output,
    )
    return metrics


def check_settings(**values) -> None:
    """Refuse settings outside the ranges of the recipe's generate: section: a recipe and the command line are
    checked as they load, a library caller's settings here."""
    for name, value in values.items():
        problem = GenerateConfig.out_of_range(name, value)
        if problem:
            raise SelfieError(f"generate: {name}: {problem}")


def rows_to_do(resumable: ResumableJsonl, mine: list[dict], sampler: str | None) -> list[dict]:
    """The prompts of `mine` that the partial file does not hold yet (those it holds: by the same sampler)."""
    todo = [row for row in mine if row["prompt_id"] not in resumable.done_keys]
    if len(todo) < len(mine):
        check_same_sampler(resumable, sampler)
        logger.info("resuming %s: %d of %d prompts already done", resumable.path, len(mine) - len(todo), len(mine))
    return todo


class RowWriter:
    """Writes each group of finished prompts as it comes, as responses.jsonl rows; `done` holds their prompt ids."""

    def __init__(self, resumable: ResumableJsonl, tokenizer: PreTrainedTokenizerBase, sampler: str | None, bar: tqdm):
        self.resumable, self.tokenizer, self.sampler, self.bar = resumable, tokenizer, sampler, bar
        self.done: set[str] = set()

    def __call__(self, samples: Samples) -> int:
        """Write every group of `samples`; returns the new tokens written (a stop token counts)."""
        tokens = 0
        with contextlib.closing(samples):  # an error here stops a continuous engine's thread too
            for group in samples:
                tokens += sum(len(t) + stopped for _, outs in group for t, stopped in outs)
                self.resumable.append([self.row(row, outs) for row, outs in group])
                self.done.update(row["prompt_id"] for row, _ in group)
                self.bar.update(len(group))
        return tokens

    def row(self, prompt: dict, outs: list[Response]) -> dict:
        return {
            "prompt_id": prompt["prompt_id"],
            "prompt": prompt["prompt"],
            "responses": [self.tokenizer.decode(t, skip_special_tokens=True) for t, _ in outs],
            "finished": [stopped for _, stopped in outs],
            **({"sampler": self.sampler} if self.sampler else {}),
        }


def sample_all(
    model: PreTrainedModel | VllmPolicy,
    items: list[Item],
    s: SamplingSettings,
    backend: str,
    samplers: dict[str, Callable],
    write: RowWriter,
) -> tuple[str, int, dict]:
    """Sample and write every item with `backend` (`auto`: first the probes of `choose_backend`); returns the backend
    that sampled, the new tokens and the probe metrics."""
    metrics, new_tokens = {}, 0
    if backend == "auto":
        backend, metrics = choose_backend(model, items, s, write)
        new_tokens = metrics.pop("probe_tokens")
    new_tokens += write(samplers[backend](model, [i for i in items if i[1]["prompt_id"] not in write.done], s))
    return backend, new_tokens, metrics


def final_rows(resumable: ResumableJsonl, output: Path, mine: list[dict]) -> list[dict]:
    """This shard's rows of the partial file, sorted by prompt_id, written to `output` atomically (the partial file
    removed); returns them."""
    wanted = {row["prompt_id"] for row in mine}
    rows = sorted((row for row in read_jsonl(resumable.partial) if row["prompt_id"] in wanted), key=lambda r: r["prompt_id"])
    atomic_write_jsonl(output, rows)
    resumable.partial.unlink()
    return rows


def rate_metrics(rows: list[dict], new_tokens: int, seconds: float) -> dict:
    finished = [f for row in rows for f in row["finished"]]
    return {
        "prompts": len(rows),
        "responses": len(finished),
        "finished_fraction": sum(finished) / len(finished) if finished else None,
        "new_tokens": new_tokens,
        "seconds": round(seconds, 3),
        "tokens_per_second": new_tokens / seconds if seconds else None,
    }


def check_same_sampler(writer: ResumableJsonl, sampler: str | None) -> None:
    """Refuse to continue rows another sampler wrote: vLLM's sampler draws other tokens than selfie's for the same
    seeds, so a stage's responses come from one of them (rows without a `sampler` key are selfie's own)."""
    earlier = {row.get("sampler") or SELFIE_SAMPLER for row in read_jsonl(writer.partial)}
    if earlier != {sampler or SELFIE_SAMPLER}:
        raise SelfieError(
            f"{writer.partial}: these responses were sampled by {', '.join(sorted(earlier))}; resuming them with "
            f"{sampler or SELFIE_SAMPLER} would mix samplers (use the same generate.backend, or delete the .partial file)"
        )


def choose_backend(
    model: PreTrainedModel, items: list[Item], s: SamplingSettings, write: Callable[[Samples], int]
) -> tuple[str, dict]:
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
