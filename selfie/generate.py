"""Sample K responses per prompt from the current policy (docs/METHOD.md section 1.3).

A small sampling loop instead of `model.generate`: every (prompt, k) row draws its tokens from its
own `torch.Generator`, seeded from (run seed, prompt_id, k), so a prompt's responses do not depend
on the batch size, the batch order or which other prompts share its batch (HF generate shares one
RNG across the batch). Rows are written as their prompts complete, so a killed run resumes where
it stopped; the final responses.jsonl is sorted by prompt_id and written atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from selfie.errors import SelfieError
from selfie.io import ResumableJsonl, atomic_write_jsonl, check_writable, read_jsonl

logger = logging.getLogger(__name__)


def chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of a conversation rendered by the chat template (the way TRL's DPO tokenizes it)."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def stop_token_ids(model: PreTrainedModel | GenerationConfig | None, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokenizer's EOS plus any end-of-turn ids in the generation config (e.g. Llama 3's <|eot_id|>)."""
    ids = {tokenizer.eos_token_id}
    config = model if isinstance(model, GenerationConfig) else getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    ids.discard(None)
    return ids


def row_seed(seed: int, prompt_id: str, k: int) -> int:
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}\x00{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def select_shard(rows: Sequence[dict], shard: tuple[int, int]) -> list[dict]:
    """Rows i (in prompt_id order) with i % world == rank."""
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard {shard}: need 0 <= rank < world")
    return [row for i, row in enumerate(sorted(rows, key=lambda r: r["prompt_id"])) if i % world == rank]


def check_prompt_rows(rows: Sequence[dict], source: str) -> None:
    """Each row needs a unique string prompt_id and a non-empty list of {role, content} messages."""
    seen: set[str] = set()
    for n, row in enumerate(rows, 1):
        where = f"{source}: row {n}"
        for key in ("prompt_id", "prompt"):
            if key not in row:
                raise SelfieError(f"{where}: missing key '{key}'")
        if not isinstance(row["prompt_id"], str):
            raise SelfieError(f"{where}: key 'prompt_id' must be a string")
        if row["prompt_id"] in seen:
            raise SelfieError(f"{where}: duplicate prompt_id '{row['prompt_id']}'")
        seen.add(row["prompt_id"])
        prompt = row["prompt"]
        if not isinstance(prompt, list) or not prompt or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
        ):
            raise SelfieError(f"{where}: key 'prompt' must be a non-empty list of {{role, content}} messages")


def _draw(logits: torch.Tensor, generators: list[torch.Generator], temperature: float, top_p: float) -> torch.Tensor:
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
    model: PreTrainedModel, prompts: list[list[int]], generators: list[list[torch.Generator]], *, max_new_tokens: int,
    temperature: float, top_p: float, stop_ids: set[int], pad_id: int,
) -> list[list[tuple[list[int], bool]]]:
    """Sample len(generators[p]) continuations of each prompt p; returns (token ids without the stop token, finished).

    The prompts are prefilled once (left padded) and their KV cache repeated for their K rows; rows
    that stop leave the batch so the rest decode faster.
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
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
    for step in range(max_new_tokens):
        drawn = _draw(logits.float(), [rows_gen[r] for r in active], temperature, top_p).tolist()
        keep = []
        for j, (row, token) in enumerate(zip(active, drawn)):
            if token in stop_ids:
                finished[row] = True
            else:
                tokens[row].append(token)
                keep.append(j)
        if not keep or step == max_new_tokens - 1:
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


def generate_responses(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[dict], output: str | Path, *,
    num_responses: int = 2, max_new_tokens: int = 300, temperature: float = 0.7, top_p: float = 1.0, seed: int = 42,
    batch_size: int = 8, shard: tuple[int, int] = (0, 1),
) -> dict:
    """Write responses.jsonl rows {prompt_id, prompt, responses, finished} for this shard's prompts; return metrics.

    `batch_size` counts sequences decoded together (prompts x num_responses). A rerun after an
    interruption continues from `<output>.partial` and skips the prompts already done.
    """
    if num_responses < 1 or max_new_tokens < 1 or batch_size < 1:
        raise SelfieError("generate: num_responses, max_new_tokens and batch_size must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise SelfieError(f"generate: need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    check_prompt_rows(prompts, "prompts")
    mine = select_shard(prompts, shard)
    output = Path(output)
    writer = ResumableJsonl(output)
    todo = [row for row in mine if row["prompt_id"] not in writer.done_keys]
    if len(todo) < len(mine):
        logger.info("resuming %s: %d of %d prompts already done", output, len(mine) - len(todo), len(mine))

    # Shortest prompts first, so a batch holds prompts of similar length (little padding).
    encoded = sorted(((chat_ids(tokenizer, row["prompt"], True), row) for row in todo), key=lambda e: (len(e[0]), e[1]["prompt_id"]))
    per_batch = max(1, batch_size // num_responses)
    device = next(model.parameters()).device
    stop_ids, pad_id = stop_token_ids(model, tokenizer), tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    new_tokens, start = 0, time.perf_counter()
    try:
        with tqdm(total=len(encoded), desc="generate", unit="prompt", disable=None) as bar:
            for b in range(0, len(encoded), per_batch):
                chunk = encoded[b:b + per_batch]
                generators = [[torch.Generator(device).manual_seed(row_seed(seed, row["prompt_id"], k)) for k in range(num_responses)]
                              for _, row in chunk]
                samples = sample_batch(model, [ids for ids, _ in chunk], generators, max_new_tokens=max_new_tokens,
                                       temperature=temperature, top_p=top_p, stop_ids=stop_ids, pad_id=pad_id)
                rows = []
                for (_, row), outs in zip(chunk, samples):
                    new_tokens += sum(len(t) + done for t, done in outs)  # the stop token was generated too
                    rows.append({"prompt_id": row["prompt_id"], "prompt": row["prompt"],
                                 "responses": [tokenizer.decode(t, skip_special_tokens=True) for t, _ in outs],
                                 "finished": [done for _, done in outs]})
                writer.append(rows)
                bar.update(len(chunk))
    finally:
        writer.close()
    seconds = time.perf_counter() - start

    wanted = {row["prompt_id"] for row in mine}
    rows = sorted((row for row in read_jsonl(writer.partial) if row["prompt_id"] in wanted), key=lambda r: r["prompt_id"])
    atomic_write_jsonl(output, rows)
    writer.partial.unlink()
    finished = [f for row in rows for f in row["finished"]]
    metrics = {"prompts": len(rows), "responses": len(finished), "finished_fraction": sum(finished) / len(finished) if finished else None,
               "new_tokens": new_tokens, "seconds": round(seconds, 3), "tokens_per_second": new_tokens / seconds if seconds else None}
    logger.info("generated %d responses for %d prompts (%.1f tokens/s) -> %s", len(finished), len(rows),
                metrics["tokens_per_second"] or 0.0, output)
    return metrics


def add_sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """--max-new-tokens, --temperature, --top-p, --batch-size, in the ranges the recipe's generate: keys have."""
    from selfie.config import GenerateConfig, cli_number

    ranges = GenerateConfig.RANGES
    parser.add_argument("--max-new-tokens", type=cli_number(int, ranges["max_new_tokens"]), default=max_new_tokens)
    parser.add_argument("--temperature", type=cli_number(float, ranges["temperature"]), default=0.7, help="0 = greedy")
    parser.add_argument("--top-p", type=cli_number(float, ranges["top_p"]), default=1.0)
    parser.add_argument("--batch-size", type=cli_number(int, ranges["batch_size"]), default=8, help="sequences decoded together")


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    from selfie.config import POSITIVE, cli_number

    parser.add_argument("--model", required=True, help="hub id, local directory, .gguf file or built-in alias")
    parser.add_argument("--adapter", default=None, help="PEFT adapter directory to sample from (default: the bare model)")
    parser.add_argument("--prompts", required=True, help=".jsonl/.json/.parquet file, saved dataset dir, hub id or 'demo'")
    parser.add_argument("--output", required=True, help="responses.jsonl to write")
    parser.add_argument("--num-responses", type=cli_number(int, POSITIVE), default=2, help="responses per prompt (K)")
    add_sampling_args(parser, max_new_tokens=300)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")


def run_generate_command(args: argparse.Namespace) -> None:
    from selfie.data import load_prompts
    from selfie.models import load_policy
    from selfie.rundir import output_lock

    check_writable(args.output, directory=False)
    prompts = load_prompts(args.prompts)
    with output_lock(args.output):
        model, tokenizer = load_policy(args.model, args.adapter, args.dtype)
        if torch.cuda.is_available():
            model.to("cuda")
        generate_responses(model, tokenizer, prompts, args.output, num_responses=args.num_responses,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           seed=args.seed, batch_size=args.batch_size)
