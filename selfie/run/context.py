"""What the stages and the labellers share: the run's context as a stage sees it, and work sharded over the ranks
with a model loaded on each (the policy, or a judge spec)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from selfie.data import Splits
from selfie.dist import Ranks
from selfie.evaluation.judges import Judge, load_judge
from selfie.evaluation.labels import label_responses
from selfie.models import load_generation_config, load_policy, load_tokenizer
from selfie.run.rundir import RunContext
from selfie.tokens import stop_token_ids


@dataclass
class StageContext(RunContext):
    """The run's context as the stages see it: its paths and plan, this process's ranks, and the prompt slices."""

    ranks: Ranks
    splits: Splits | None = None  # from the preflight, on every rank; None when no remaining stage reads prompts


def policy_shards(ctx: StageContext, adapter: Path | None, final: Path, work: Callable) -> dict:
    """pi_init + adapter on this rank's device, then `work(model, tokenizer, out, shard)` on this rank's shard of
    `final` (merged on rank 0); returns the ranks' metrics combined."""
    model, tokenizer = load_policy(ctx.pi_init, adapter, ctx.config.model, device=ctx.ranks.device)
    return ctx.ranks.sharded(final, lambda out, shard: work(model, tokenizer, out, shard))


def spec_scores(ctx: StageContext, spec: str, responses: list[dict], final: Path) -> dict:
    """`final`'s judgments of the responses by the judge `spec`, loaded on every rank (on its device). A judge
    served over HTTP logs each rank's answers beside `final`, so a killed stage asks again only for the rest."""
    answers = final.with_name(f"{final.stem}.answers.rank{ctx.ranks.state.process_index}.jsonl")
    return judge_shards(ctx, load_judge(spec, ctx.config.model.dtype, answers), responses, final)


def judge_shards(ctx: StageContext, judge: Judge, responses: list[dict], final: Path) -> dict:
    """`final`'s judgments of the responses by `judge`, sharded over the ranks; each shard resumes from the prompts
    it had scored when it was interrupted."""
    tokenizer, stop_ids = tokenizer_and_stops(ctx)
    return ctx.ranks.sharded(final, lambda out, shard: label_responses(judge, responses, out, tokenizer, stop_ids, shard))


def tokenizer_and_stops(ctx: StageContext):
    """pi_init's tokenizer and the token ids that end its responses."""
    tokenizer = load_tokenizer(ctx.pi_init, ctx.config.model)
    return tokenizer, stop_ids_of(ctx, tokenizer)


def stop_ids_of(ctx: StageContext, tokenizer) -> set[int]:
    """The token ids that end pi_init's responses (its generation config's and the tokenizer's)."""
    return stop_token_ids(load_generation_config(ctx.pi_init), tokenizer)
