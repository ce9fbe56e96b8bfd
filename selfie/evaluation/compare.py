"""Generate on held-out prompts and score with a judge: model-vs-model win rates, per-iteration scores of a run,
and the loop's per-iteration eval stage."""

from __future__ import annotations

import gc
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfie.config.schema import EvalOptions, ModelConfig, RecipeConfig, Sources
from selfie.data import describe_sources, load_prompts, pool_prompts, split_prompts
from selfie.errors import SelfieError
from selfie.evaluation.judges import Judge, load_judge
from selfie.evaluation.stats import bootstrap_ci, length_adjusted, win_rate
from selfie.generation.generate import generate_responses, load_generator
from selfie.io import atomic_write_jsonl, read_jsonl
from selfie.run.rundir import RunContext

logger = logging.getLogger(__name__)

INIT = -1  # run_scores key of pi_init (the run's base model, no adapter)


def eval_prompts(source: Sources, split: str, num_prompts: int | None, config: RecipeConfig | None = None) -> list[dict]:
    """The first `num_prompts` prompts of `source`; for the run's own prompt pool (a mixture drawn as the run drew
    it), of its held-out slice. A run's data.system_prompt opens them as it opens the prompts the run trains on."""
    if config is not None and (source, split) == (config.data.prompts, config.data.split):
        d = config.data
        prompts = split_prompts(pool_prompts(d), d.seed_size, d.iteration_sizes, d.shuffle_seed).held_out
        if not prompts:
            raise SelfieError(
                f"eval.prompts '{describe_sources(source)}': no held-out prompts left after the seed and iteration slices"
            )
    else:
        prompts = load_prompts(source, split, system_prompt=config.data.system_prompt if config is not None else None)
    return prompts[:num_prompts] if num_prompts else prompts


def generate_one(
    model: str,
    adapter: str | Path | None,
    prompts: list[dict],
    output: Path,
    *,
    dtype: str | ModelConfig = "auto",
    **sampling: Any,
) -> list[str]:
    """One response per prompt from `model` (+ `adapter`; `dtype`, or a run's model: section, says how it loads),
    written to `output`; returns the texts in prompt order."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy, tokenizer = load_generator(model, adapter, dtype, sampling["backend"], device)
    generate_responses(policy, tokenizer, prompts, output, num_responses=1, **sampling)
    del policy
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    by_id = {row["prompt_id"]: row["responses"][0] for row in read_jsonl(output)}
    return [by_id[row["prompt_id"]] for row in prompts]


def score_unique(judge: Judge, prompts: list[list[dict]], responses: list[str]) -> list[float]:
    """Score each distinct (prompt, response) once, so identical texts get identical scores (an exact tie)."""
    keys = [(json.dumps(p, sort_keys=True), r) for p, r in zip(prompts, responses)]
    unique = list(dict.fromkeys(keys))
    scores = judge.score([json.loads(p) for p, _ in unique], [r for _, r in unique])
    lookup = dict(zip(unique, scores))
    return [lookup[k] for k in keys]


def _summary(scores: list[float], texts: list[str], n_boot: int, seed: int) -> dict:
    values = np.asarray(scores, dtype=float)
    return {
        "score_mean": float(values.mean()),
        "ci95": bootstrap_ci(values, n_boot, seed),
        "n": len(values),
        "chars_mean": float(np.mean([len(t) for t in texts])),
    }


def compare_models(
    judge: Judge,
    model_a: str,
    adapter_a: str | None,
    model_b: str,
    adapter_b: str | None,
    prompts: list[dict],
    options: EvalOptions = EvalOptions(),
    *,
    output_dir: str | Path | None = None,
    model_settings: ModelConfig | None = None,
) -> dict:
    """Win rate of A over B: one response per prompt from each (same sampling seed), scored by `judge`.

    Responses go to `output_dir` (responses_a.jsonl, responses_b.jsonl, scores.jsonl), else to a temporary directory.
    `model_settings` (a run's model: section) loads both models, else options.dtype.
    """
    if not prompts:
        raise SelfieError("compare: no prompts")
    seed, n_boot, settings = options.seed, options.n_boot, model_settings or options.dtype
    with tempfile.TemporaryDirectory(prefix="selfie-eval-") as tmp:
        out = Path(output_dir) if output_dir is not None else Path(tmp)
        texts_a = generate_one(model_a, adapter_a, prompts, out / "responses_a.jsonl", dtype=settings, **options.sampling())
        texts_b = generate_one(model_b, adapter_b, prompts, out / "responses_b.jsonl", dtype=settings, **options.sampling())
        messages = [row["prompt"] for row in prompts]
        scores = score_unique(judge, messages + messages, texts_a + texts_b)
        scores_a, scores_b = scores[: len(prompts)], scores[len(prompts) :]
        if output_dir is not None:
            atomic_write_jsonl(
                out / "scores.jsonl",
                (
                    {"prompt_id": row["prompt_id"], "response_a": ta, "response_b": tb, "score_a": sa, "score_b": sb}
                    for row, ta, tb, sa, sb in zip(prompts, texts_a, texts_b, scores_a, scores_b)
                ),
            )
    report = win_rate(scores_a, scores_b, n_boot=n_boot, seed=seed)
    report.update(length_adjusted(scores_a, scores_b, [len(t) for t in texts_a], [len(t) for t in texts_b], n_boot, seed))
    report["a"] = {"model": model_a, "adapter": adapter_a and str(adapter_a), **_summary(scores_a, texts_a, n_boot, seed)}
    report["b"] = {"model": model_b, "adapter": adapter_b and str(adapter_b), **_summary(scores_b, texts_b, n_boot, seed)}
    return report


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

    Key INIT (-1) is pi_init itself (no adapter) when `include_init`. Responses go to
    `output_dir/responses_<label>.jsonl` when given.
    """
    adapters = ctx.adapters_on_disk()
    if not adapters:
        raise SelfieError(f"{ctx.run_dir}: no finished adapters yet")
    models: dict[int, Path | None] = ({INIT: None} if include_init else {}) | adapters
    messages = [row["prompt"] for row in prompts]
    results = {}
    with tempfile.TemporaryDirectory(prefix="selfie-eval-") as tmp:
        out = Path(output_dir) if output_dir is not None else Path(tmp)
        for iteration, adapter in models.items():
            label = iteration_label(ctx, iteration)
            texts = generate_one(
                ctx.pi_init, adapter, prompts, out / f"responses_{label}.jsonl", dtype=options.dtype, **options.sampling()
            )
            results[iteration] = _summary(score_unique(judge, messages, texts), texts, options.n_boot, options.seed)
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


def evaluate_iteration(ctx: RunContext, t: int) -> dict:
    """The loop's eval stage: iteration t's policy against a baseline on held-out prompts, scored by eval.judge.

    Responses and per-prompt scores are kept in the iteration's eval directory for inspection.
    """
    start = time.perf_counter()
    config, eval_cfg, pi_init, adapter = ctx.config, ctx.config.eval, ctx.pi_init, ctx.adapter(t)
    prompts = eval_prompts(eval_cfg.prompts, eval_cfg.split or config.data.split, eval_cfg.num_prompts, config)
    judge = load_judge(eval_cfg.judge, dtype=config.model.dtype)
    temperature = config.generate.temperature if eval_cfg.temperature is None else eval_cfg.temperature
    options = EvalOptions(
        max_new_tokens=eval_cfg.max_new_tokens,
        temperature=temperature,
        top_p=config.generate.top_p,
        seed=config.seed,
        batch_size=config.generate.batch_size,
        backend=config.generate.backend,
        dtype=config.model.dtype,
        n_boot=eval_cfg.n_boot,
    )
    out = ctx.eval_dir(t)
    if eval_cfg.baseline == "none":
        texts = generate_one(pi_init, adapter, prompts, out / "responses_a.jsonl", dtype=config.model, **options.sampling())
        summary = _summary(score_unique(judge, [row["prompt"] for row in prompts], texts), texts, options.n_boot, options.seed)
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
