"""The iteration labellers (`judge.labeller`) as the run uses them, and the seed stage's label-signal check.

Each labeller has up to three jobs: be fitted on the seed pairs once the seed adapter is trained (`fit`, the
seed stage), judge iteration t's responses (`judge`, the judge stage) and, fitted on k-1 folds of the seed
pairs, judge the held-out fold (`fold`, the label-signal check: selfie/labelling/signal.py, docs/METHOD.md 1.2).

    implicit        beta * (log pi_{t-1} - log pi_init) (selfie/labelling/implicit_reward.py)
    bradley-terry   a reward head on pi_init's frozen hidden states, fitted in the seed stage (bradley_terry.py)
    ensemble        the mean implicit reward of seed adapters on bootstrap resamples, trained in the seed stage
    consistency     the mean implicit reward of the labellers already paid for: pi_{t-1}, pi_{t-2} (t >= 2) and the
                    label-signal check's fold adapters (kept); a pair's `agreement` is how many of them rank it alike
                    (CREAM's and SCIR's consistency between labellers)
    any judge spec  a reward model or a Python callable (selfie/evaluation/judges.py), fitted on nothing
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from selfie.config.schema import RecipeConfig
from selfie.evaluation.labels import score_responses
from selfie.io import atomic_write_jsonl, read_jsonl
from selfie.labelling.bradley_terry import BradleyTerryJudge, RewardHead, fit_on_pairs
from selfie.labelling.ensemble import bootstrap_resample, mean_judgments
from selfie.labelling.implicit_reward import judge_responses
from selfie.labelling.signal import fold_indices, heldout_rows, signal_accuracy, signal_line, weak
from selfie.models import load_policy
from selfie.run.context import StageContext, judge_shards, policy_shards, spec_scores, stop_ids_of
from selfie.run.rundir import ADAPTER, CHECKPOINTS
from selfie.training.arguments import seed_epochs
from selfie.training.stage import TrainOutputs, train_seed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Labeller:
    judge: Callable[[StageContext, int, list[dict]], dict]  # (ctx, t, responses) -> metrics; writes judgments(t)
    fold: Callable[[StageContext, int, list[dict], list[dict]], None]  # (ctx, fold, train pairs, held-out rows)
    fit: Callable[[StageContext], dict] | None = None  # (ctx) -> metrics, after the seed adapter is trained


# ---- implicit reward


def _implicit_judge(ctx: StageContext, t: int, responses: list[dict]) -> dict:
    """Iteration t's judgments by the implicit reward beta * (log pi_{t-1} - log pi_init), sharded over the ranks."""
    return _implicit_judgments(ctx, ctx.adapter(t - 1), responses, ctx.judgments(t))


def _implicit_judgments(ctx: StageContext, adapter: Path, responses: list[dict], final: Path) -> dict:
    c = ctx.config
    return policy_shards(
        ctx,
        adapter,
        final,
        lambda policy, tokenizer, out, shard: judge_responses(
            policy, tokenizer, responses, out, None, beta=c.train.beta, judge=c.judge, shard=shard
        ),
    )


def _implicit_fold(ctx: StageContext, fold: int, train_pairs: list[dict], rows: list[dict]) -> None:
    """A seed adapter trained on the other folds (the recipe's seed training, not reported to the trackers) judges
    the held-out rows by the implicit reward, as iteration 1's labeller would."""
    _fold_adapter_judgments(ctx, fold, train_pairs, rows, ctx.signal_work(fold) / ADAPTER)


def _fold_adapter_judgments(ctx: StageContext, fold: int, train_pairs: list[dict], rows: list[dict], adapter: Path) -> None:
    """Train the fold's seed adapter into `adapter` (unless a killed check saved it: saved atomically, there means
    complete), then judge the held-out rows with it."""
    if not adapter.exists():
        outputs = TrainOutputs(adapter=adapter, checkpoints=ctx.signal_work(fold) / CHECKPOINTS)
        train_seed(ctx.pi_init, train_pairs, outputs, _labeller_training(ctx))
    _implicit_judgments(ctx, adapter, rows, ctx.signal_judgments(fold))


# ---- a judge spec (reward model, callable)


def _spec_judge(ctx: StageContext, t: int, responses: list[dict]) -> dict:
    return spec_scores(ctx, ctx.config.judge.labeller, responses, ctx.judgments(t))


def _spec_fold(ctx: StageContext, fold: int, train_pairs: list[dict], rows: list[dict]) -> None:
    """A judge spec is fitted on nothing: it scores the held-out rows as they are."""
    spec_scores(ctx, ctx.config.judge.labeller, rows, ctx.signal_judgments(fold))


# ---- Bradley-Terry head on pi_init's hidden states


def _fit_head(ctx: StageContext) -> dict:
    """RUN/iter_000/reward_head, fitted on rank 0 on every seed pair (kept if an interrupted stage wrote it)."""

    def fit() -> dict:
        if not ctx.reward_head.exists():
            model, tokenizer = load_policy(ctx.pi_init, None, ctx.config.model, device=ctx.ranks.device)
            fit_on_pairs(model, tokenizer, read_jsonl(ctx.pairs(0)), ctx.config.judge.bradley_terry_l2).save(ctx.reward_head)
        return {"reward_head": ctx.relative(ctx.reward_head)}

    return ctx.ranks.on_main(fit)


def _head_judge(ctx: StageContext, t: int, responses: list[dict]) -> dict:
    model, tokenizer = load_policy(ctx.pi_init, None, ctx.config.model, device=ctx.ranks.device)
    judge = BradleyTerryJudge(model, tokenizer, RewardHead.load(ctx.reward_head))
    return judge_shards(ctx, judge, responses, ctx.judgments(t))


def _head_fold(ctx: StageContext, fold: int, train_pairs: list[dict], rows: list[dict]) -> None:
    """A head fitted on the other folds scores the held-out rows (on rank 0: one pass of pi_init over the seed)."""

    def judge() -> None:
        model, tokenizer = load_policy(ctx.pi_init, None, ctx.config.model, device=ctx.ranks.device)
        head = fit_on_pairs(model, tokenizer, train_pairs, ctx.config.judge.bradley_terry_l2)
        judged = score_responses(BradleyTerryJudge(model, tokenizer, head), rows, tokenizer, stop_ids_of(ctx, tokenizer))
        atomic_write_jsonl(ctx.signal_judgments(fold), judged)

    ctx.ranks.on_main(judge)


# ---- an ensemble of seed adapters on bootstrap resamples of the seed pairs


def _train_members(ctx: StageContext, pairs: list[dict], directory: Path) -> None:
    """`judge.ensemble_size` seed adapters, member m trained on bootstrap resample m of `pairs` into
    directory/member_m/adapter (each kept once saved, so an interrupted fit resumes by member)."""
    c = ctx.config
    for m in range(c.judge.ensemble_size):
        member = directory / f"member_{m}"
        if (member / ADAPTER).exists():  # saved atomically: there means complete
            continue
        outputs = TrainOutputs(adapter=member / ADAPTER, checkpoints=member / CHECKPOINTS)
        train_seed(ctx.pi_init, bootstrap_resample(pairs, m, c.seed), outputs, _labeller_training(ctx))
        ctx.ranks.on_main(lambda done=outputs.checkpoints: shutil.rmtree(done, ignore_errors=True))


def _members(directory: Path, count: int) -> list[Path]:
    return [directory / f"member_{m}" / ADAPTER for m in range(count)]


def _mean_judgments(ctx: StageContext, adapters: list[Path], responses: list[dict], work: Path, final: Path) -> dict:
    """Each member adapter's implicit-reward judgments of the responses (work/member_m.jsonl, kept), then their mean
    in `final` (selfie/labelling/ensemble.py)."""
    paths = [work / f"member_{m}.jsonl" for m in range(len(adapters))]
    metrics = [_implicit_judgments(ctx, adapter, responses, path) for adapter, path in zip(adapters, paths) if not path.exists()]
    ctx.ranks.on_main(lambda: atomic_write_jsonl(final, mean_judgments([read_jsonl(path) for path in paths])))
    return {"members": len(paths), "member_metrics": metrics}


def _fit_ensemble(ctx: StageContext) -> dict:
    _train_members(ctx, read_jsonl(ctx.pairs(0)), ctx.ensemble)
    return {"ensemble": ctx.relative(ctx.ensemble), "members": ctx.config.judge.ensemble_size}


def _ensemble_judge(ctx: StageContext, t: int, responses: list[dict]) -> dict:
    members = _members(ctx.ensemble, ctx.config.judge.ensemble_size)
    return _mean_judgments(ctx, members, responses, ctx.member_judgments(t), ctx.judgments(t))


def _ensemble_fold(ctx: StageContext, fold: int, train_pairs: list[dict], rows: list[dict]) -> None:
    """Members trained on resamples of the other folds judge the held-out rows."""
    work = ctx.signal_work(fold)
    _train_members(ctx, train_pairs, work)
    _mean_judgments(ctx, _members(work, ctx.config.judge.ensemble_size), rows, work, ctx.signal_judgments(fold))


# ---- consistency: the labellers already paid for


def consistency_members(ctx: StageContext, t: int) -> list[Path]:
    """Iteration t's labellers: pi_{t-1} (the implicit reward's own), pi_{t-2} when there is one, and the fold
    adapters the label-signal check kept."""
    folds = sorted(ctx.fold_adapters.glob(f"fold_*/{ADAPTER}")) if ctx.fold_adapters.exists() else []
    return [ctx.adapter(t - 1), *([ctx.adapter(t - 2)] if t >= 2 else []), *folds]


def _consistency_judge(ctx: StageContext, t: int, responses: list[dict]) -> dict:
    return _mean_judgments(ctx, consistency_members(ctx, t), responses, ctx.member_judgments(t), ctx.judgments(t))


def _consistency_fold(ctx: StageContext, fold: int, train_pairs: list[dict], rows: list[dict]) -> None:
    """The implicit reward's check, its fold adapter kept (RUN/iter_000/fold_adapters/fold_K) as a labeller."""
    _fold_adapter_judgments(ctx, fold, train_pairs, rows, ctx.fold_adapters / f"fold_{fold}" / ADAPTER)


def _labeller_training(ctx: StageContext) -> RecipeConfig:
    """The recipe for a labeller's own seed trainings: the seed stage's epoch count (SPA's rule would give a fold's
    share of a 2,000-pair seed 3 epochs where the seed stage trains 1), not reported to the trackers (the run's
    seed stage is)."""
    c = ctx.config
    epochs = seed_epochs(c.train, len(read_jsonl(ctx.pairs(0))))
    return dataclasses.replace(c, report_to=[], train=dataclasses.replace(c.train, seed_epochs=epochs))


LABELLERS = {
    "implicit": Labeller(_implicit_judge, _implicit_fold),
    "bradley-terry": Labeller(_head_judge, _head_fold, _fit_head),
    "ensemble": Labeller(_ensemble_judge, _ensemble_fold, _fit_ensemble),
    "consistency": Labeller(_consistency_judge, _consistency_fold),
}
SPEC_LABELLER = Labeller(_spec_judge, _spec_fold)


def labeller_for(name: str) -> Labeller:
    """`judge.labeller`'s jobs: a built-in labeller's, or a judge spec's."""
    return LABELLERS.get(name, SPEC_LABELLER)


# ---- the label-signal check


def label_signal(ctx: StageContext) -> dict:
    """How well the iteration labeller, fitted on k-1 folds of the seed pairs, ranks the held-out fold's gold pairs
    (selfie/labelling/signal.py); each fold's judgments are kept, so an interrupted check resumes by fold."""
    c, started = ctx.config, time.perf_counter()
    folds, pairs = c.judge.signal_folds, read_jsonl(ctx.pairs(0))
    if not folds:
        return {"skipped": "judge.signal_folds is 0"}
    if len(pairs) < 2 * folds:
        return {"skipped": f"{len(pairs)} seed pairs are too few for {folds} folds"}
    judged = []
    for fold, held in enumerate(fold_indices(len(pairs), folds, c.seed)):
        rows = heldout_rows(pairs, held, c.seed)
        if not ctx.signal_judgments(fold).exists():
            kept = set(held)
            labeller_for(c.judge.labeller).fold(ctx, fold, [p for i, p in enumerate(pairs) if i not in kept], rows)
        # what the fold's labeller fitted (adapters) goes once its judgments are in, also after a kill in between
        work = ctx.signal_work(fold)
        ctx.ranks.on_main(lambda work=work: shutil.rmtree(work, ignore_errors=True))
        judged.append((rows, read_jsonl(ctx.signal_judgments(fold))))
    signal = {"folds": folds, "labeller": c.judge.labeller, **signal_accuracy(judged, c.judge.rules, c.seed)}
    signal["seconds"] = round(time.perf_counter() - started, 2)
    (logger.warning if weak(signal) else logger.info)("%s", signal_line(signal))
    return signal
