"""A run's iterations evaluated: the loop's eval stage (each iteration against `eval.baseline`) and `selfie eval run`
(every iteration's mean score), and the settings a run's policy answers with; the comparisons themselves are
selfie/evaluation/compare.py's."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from selfie.config.schema import EvalOptions, RecipeConfig
from selfie.errors import SelfieError
from selfie.evaluation.compare import compare_models, eval_prompts, generate_one, score_summary, score_unique
from selfie.evaluation.judges import Judge, load_judge
from selfie.run.rundir import RunContext

logger = logging.getLogger(__name__)

INIT = -1  # run_scores key of pi_init (the run's base model, no adapter)


def run_scores(
    ctx: RunContext,
    judge: Judge,
    prompts: list[dict],
    options: EvalOptions = EvalOptions(),
    *,
    output_dir: str | Path | None = None,
    include_init: bool = True,
) -> dict[int, dict]:
    """Mean judge score of each iteration's policy of a run on `prompts`: {iteration: {score_mean, ci95, n}}.

    Key INIT (-1) is pi_init itself (no adapter) when `include_init`. A pairwise judge scores each iteration's
    answers against pi_init's (the probability of beating them; pi_init itself scores 0.5). Responses go to
    `output_dir/responses_<label>.jsonl` when given.
    """
    adapters = ctx.adapters_on_disk()
    if not adapters:
        raise SelfieError(f"{ctx.run_dir}: no finished adapters yet")
    pairwise = getattr(judge, "pairwise", False)
    models: dict[int, Path | None] = ({INIT: None} if include_init or pairwise else {}) | adapters
    messages = [row["prompt"] for row in prompts]
    results, reference = {}, None
    with tempfile.TemporaryDirectory(prefix="selfie-eval-") as tmp:
        out = Path(output_dir) if output_dir is not None else Path(tmp)
        for iteration, adapter in models.items():
            label = iteration_label(ctx, iteration)
            texts = generate_one(
                ctx.pi_init, adapter, prompts, out / f"responses_{label}.jsonl", dtype=options.dtype, **options.sampling()
            )
            if pairwise and reference is None:
                reference = texts  # pi_init's, generated first
            scores = (
                score_unique(judge, messages + messages, texts + reference)[: len(texts)]
                if pairwise
                else score_unique(judge, messages, texts)
            )
            results[iteration] = score_summary(scores, texts, options.n_boot, options.seed)
            logger.info("%s: mean score %.4f", label, results[iteration]["score_mean"])
    return results


def iteration_label(ctx: RunContext, iteration: int) -> str:
    """How reports name an iteration: `init` for pi_init, else its directory's name."""
    return "init" if iteration == INIT else ctx.iteration_dir(iteration).name


def baseline_iteration(baseline: str, iteration: int) -> int | None:
    """The iteration whose policy `eval.baseline` compares iteration `iteration` against (None: pi_init)."""
    if baseline == "seed":
        return 0
    if baseline == "previous" and iteration > 0:
        return iteration - 1
    return None


def run_eval_options(config: RecipeConfig) -> EvalOptions:
    """How a run's policy answers when it is evaluated (the eval stage, `selfie answers RUN`): the generate: section's
    sampling, the run's seed and model.dtype, with the eval: section's max_new_tokens and temperature (when set) where
    the recipe has one."""
    g, e = config.generate, config.eval
    max_new_tokens, temperature, n_boot = g.max_new_tokens, g.temperature, EvalOptions.n_boot
    if e is not None:
        max_new_tokens, n_boot = e.max_new_tokens, e.n_boot
        temperature = g.temperature if e.temperature is None else e.temperature
    return EvalOptions(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=g.top_p,
        seed=config.seed,
        batch_size=g.batch_size,
        backend=g.backend,
        dtype=config.model.dtype,
        n_boot=n_boot,
    )


def evaluate_iteration(ctx: RunContext, t: int) -> dict:
    """The loop's eval stage: iteration t's policy against a baseline on held-out prompts, scored by eval.judge.

    Responses and per-prompt scores are kept in the iteration's eval directory for inspection.
    """
    start = time.perf_counter()
    config, eval_cfg, pi_init, adapter = ctx.config, ctx.config.eval, ctx.pi_init, ctx.adapter(t)
    prompts = eval_prompts(eval_cfg.prompts, eval_cfg.split or config.data.split, eval_cfg.num_prompts, config)
    out = ctx.eval_dir(t)
    judge = load_judge(eval_cfg.judge, dtype=config.model.dtype, answers=out / "judge_answers.jsonl")
    options = run_eval_options(config)
    if eval_cfg.baseline == "none":
        texts = generate_one(pi_init, adapter, prompts, out / "responses_a.jsonl", dtype=config.model, **options.sampling())
        summary = score_summary(
            score_unique(judge, [row["prompt"] for row in prompts], texts), texts, options.n_boot, options.seed
        )
        metrics = {
            "score_mean": summary["score_mean"],
            "score_ci95": summary["ci95"],
            "n": summary["n"],
            "chars_mean": summary["chars_mean"],
        }
    else:
        baseline = baseline_iteration(eval_cfg.baseline, t)
        report = compare_models(
            judge,
            pi_init,
            str(adapter),
            pi_init,
            None if baseline is None else ctx.adapter(baseline),
            prompts,
            options,
            output_dir=out,
            model_settings=config.model,
        )
        metrics = {
            "score_mean": report["a"]["score_mean"],
            "baseline_score_mean": report["b"]["score_mean"],
            "chars_mean": report["a"]["chars_mean"],
            "baseline_chars_mean": report["b"]["chars_mean"],
            **{
                k: report[k]
                for k in ("win_rate", "ci95", "length_adjusted_win_rate", "length_adjusted_ci95", "wins", "ties", "losses", "n")
            },
        }
    return {"judge": eval_cfg.judge, "baseline": eval_cfg.baseline, **metrics, "seconds": round(time.perf_counter() - start, 2)}
