"""The seed training chosen by the label-signal check (`train.seed_candidates`, docs/METHOD.md 1.2).

Every later iteration's labels only reweight what the seed adapter learnt, so the settings of the seed training
(learning rate, epochs, LoRA target modules) are worth choosing on evidence. Candidate 0 is the recipe as written,
then each of `train.seed_candidates` over it. The label-signal check runs once per candidate, in a run directory
of its own holding the seed pairs (RUN/iter_000/seed_candidates/candidate_I), its fold trainings made with the
candidate's settings; the seed adapter is trained with the candidate whose held-out accuracy is highest (the
first of equals, so the recipe's own wins a tie). The folds depend only on the run's seed, so the choice is the
same on every rerun; a killed check resumes by candidate and fold.
"""

from __future__ import annotations

import dataclasses
import shutil

from selfie.config.schema import RecipeConfig
from selfie.run.context import StageContext
from selfie.run.labellers import label_signal


def candidate_config(config: RecipeConfig, candidate: dict) -> RecipeConfig:
    """The recipe with one candidate's settings of the seed training."""
    train = {k: v for k, v in candidate.items() if k != "target_modules"}
    lora = {k: v for k, v in candidate.items() if k == "target_modules"}
    return dataclasses.replace(
        config, train=dataclasses.replace(config.train, **train), lora=dataclasses.replace(config.lora, **lora)
    )


def choose_seed_training(ctx: StageContext) -> tuple[RecipeConfig, dict]:
    """(the recipe the seed adapter is trained with, the choice's metrics: each candidate's settings and check)."""
    candidates = [{}, *ctx.config.train.seed_candidates]
    checks = [label_signal(_candidate_context(ctx, i, candidate)) for i, candidate in enumerate(candidates)]
    chosen = max(range(len(candidates)), key=lambda i: (_accuracy(checks[i]), -i))
    if ctx.config.judge.labeller == "consistency":  # the chosen candidate's fold adapters are the run's labellers
        kept = _candidate_dir(ctx, chosen) / "iter_000" / ctx.fold_adapters.name
        ctx.ranks.on_main(lambda: ctx.fold_adapters.exists() or kept.rename(ctx.fold_adapters))
    metrics = {
        "chosen": chosen,
        "candidates": [{"settings": candidate, "label_signal": check} for candidate, check in zip(candidates, checks)],
    }
    return candidate_config(ctx.config, candidates[chosen]), metrics


def _accuracy(check: dict) -> float:
    """A check that was skipped or kept no held-out pair ranks below any measured one."""
    accuracy = check.get("accuracy")
    return -1.0 if accuracy is None else accuracy


def _candidate_dir(ctx: StageContext, i: int):
    return ctx.iteration_dir(0) / "seed_candidates" / f"candidate_{i}"


def _candidate_context(ctx: StageContext, i: int, candidate: dict) -> StageContext:
    """A run directory holding only the run's seed pairs, under the candidate's recipe: where the check runs."""
    config = candidate_config(dataclasses.replace(ctx.config, report_to=[]), candidate)
    candidate_ctx = StageContext(config, _candidate_dir(ctx, i), ctx.ranks, ctx.splits)
    candidate_ctx.init_model = ctx.init_model  # an edited pi_init is the run's, built once

    def copy_pairs() -> None:
        if not candidate_ctx.pairs(0).exists():
            candidate_ctx.pairs(0).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ctx.pairs(0), candidate_ctx.pairs(0))

    ctx.ranks.on_main(copy_pairs)
    return candidate_ctx
