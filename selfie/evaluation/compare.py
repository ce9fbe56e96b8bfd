"""Generate on held-out prompts and score with a judge: model-vs-model win rates and mean scores (a run's
iterations are evaluated with these by selfie/run/evaluation.py)."""

from __future__ import annotations

import gc
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfie.config.schema import EvalOptions, ModelConfig, RecipeConfig, Sources
from selfie.data import describe_sources, load_prompts, pool_prompts, split_prompts
from selfie.errors import SelfieError
from selfie.evaluation.judges import Judge
from selfie.generation.generate import generate_responses, load_generator
from selfie.io import atomic_write_jsonl, read_jsonl
from selfie.stats import bootstrap_ci, length_adjusted, win_rate

logger = logging.getLogger(__name__)


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
    return read_answers(output, prompts)


def read_answers(path: Path, prompts: list[dict]) -> list[str]:
    """The first response per prompt of a responses file, in `prompts`' order."""
    by_id = {row["prompt_id"]: row["responses"][0] for row in read_jsonl(path)}
    return [by_id[row["prompt_id"]] for row in prompts]


def score_unique(judge: Judge, prompts: list[list[dict]], responses: list[str]) -> list[float]:
    """Score each distinct (prompt, response) once, so identical texts get identical scores (an exact tie)."""
    keys = [(json.dumps(p, sort_keys=True), r) for p, r in zip(prompts, responses)]
    unique = list(dict.fromkeys(keys))
    scores = judge.score([json.loads(p) for p, _ in unique], [r for _, r in unique])
    lookup = dict(zip(unique, scores))
    return [lookup[k] for k in keys]


def score_summary(scores: list[float], texts: list[str], n_boot: int, seed: int) -> dict:
    """Mean score with its interval over the answers the judge gave a verdict on (`unjudged`: those it did not)."""
    values = np.asarray(scores, dtype=float)
    judged = values[~np.isnan(values)]
    if not len(judged):
        raise SelfieError(f"the judge gave no readable verdict on any of {len(values)} answers")
    return {
        "score_mean": float(judged.mean()),
        "ci95": bootstrap_ci(judged, n_boot, seed),
        "n": len(judged),
        "unjudged": len(values) - len(judged),
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
    judged = [i for i, (a, b) in enumerate(zip(scores_a, scores_b)) if not (np.isnan(a) or np.isnan(b))]
    if not judged:
        raise SelfieError(f"compare: the judge gave no readable verdict on any of {len(prompts)} prompts")
    pick = lambda values: [values[i] for i in judged]  # noqa: E731
    report = win_rate(pick(scores_a), pick(scores_b), n_boot=n_boot, seed=seed)
    lengths_a, lengths_b = pick([len(t) for t in texts_a]), pick([len(t) for t in texts_b])
    report.update(length_adjusted(pick(scores_a), pick(scores_b), lengths_a, lengths_b, n_boot, seed))
    report["unjudged"] = len(prompts) - len(judged)
    report["a"] = {"model": model_a, "adapter": adapter_a and str(adapter_a), **score_summary(scores_a, texts_a, n_boot, seed)}
    report["b"] = {"model": model_b, "adapter": adapter_b and str(adapter_b), **score_summary(scores_b, texts_b, n_boot, seed)}
    return report
