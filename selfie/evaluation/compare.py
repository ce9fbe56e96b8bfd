"""Generate on held-out prompts and score with a judge: model-vs-model win rates, per-iteration scores of a run,
and the loop's per-iteration eval stage."""

from __future__ import annotations

import gc
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from selfie.errors import SelfieError
from selfie.evaluation.judges import Judge, load_judge
from selfie.evaluation.stats import bootstrap_ci, length_controlled, win_rate
from selfie.io import atomic_write_jsonl, read_jsonl

if TYPE_CHECKING:
    from selfie.config import RecipeConfig

logger = logging.getLogger(__name__)

INIT = -1  # run_scores key of pi_init (the run's base model, no adapter)
EVAL_DEFAULTS: dict[str, Any] = {
    "judge": None,  # required: a judge spec (see selfie.evaluation.judges)
    "prompts": "demo",  # prompt source; the run's own pool means its held-out slice
    "split": None,  # dataset split; default the run's data.split
    "num_prompts": 16,
    "max_new_tokens": 64,
    "temperature": None,  # default the run's generate.temperature
    "baseline": "init",  # compared against: pi_init, the seed adapter, the previous iteration, or nothing
    "n_boot": 2000,
}
BASELINES = ("init", "seed", "previous", "none")


def eval_prompts(source: str, split: str, num_prompts: int | None, config: RecipeConfig | None = None) -> list[dict]:
    """The first `num_prompts` prompts of `source`; for the run's own prompt pool, of its held-out slice."""
    from selfie.data import load_prompts, split_prompts

    prompts = load_prompts(source, split)
    if config is not None and (source, split) == (config.data.prompts, config.data.split):
        d = config.data
        prompts = split_prompts(prompts, d.seed_size, d.iteration_sizes, d.shuffle_seed).held_out
        if not prompts:
            raise SelfieError(f"eval.prompts '{source}': no held-out prompts left after the seed and iteration slices")
    return prompts[:num_prompts] if num_prompts else prompts


def generate_one(model: str, adapter: str | Path | None, prompts: list[dict], output: Path, *, dtype: str = "auto",
                 **sampling: Any) -> list[str]:
    """One response per prompt from `model` (+ `adapter`), written to `output`; returns the texts in prompt order."""
    from selfie.generate import generate_responses
    from selfie.models import load_policy

    policy, tokenizer = load_policy(model, adapter, dtype)
    if torch.cuda.is_available():
        policy.to("cuda")
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
    return {"score_mean": float(values.mean()), "ci95": bootstrap_ci(values, n_boot, seed), "n": len(values),
            "length_mean": float(np.mean([len(t) for t in texts]))}


def compare_models(judge: Judge, model_a: str, adapter_a: str | None, model_b: str, adapter_b: str | None,
                   prompts: list[dict], *, output_dir: str | Path | None = None, max_new_tokens: int = 256,
                   temperature: float = 0.7, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
                   dtype: str = "auto", n_boot: int = 2000) -> dict:
    """Win rate of A over B: one response per prompt from each (same sampling seed), scored by `judge`.

    Responses go to `output_dir` (responses_a.jsonl, responses_b.jsonl, scores.jsonl), else to a temporary directory.
    """
    if not prompts:
        raise SelfieError("compare: no prompts")
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size)
    with tempfile.TemporaryDirectory(prefix="selfie-eval-") as tmp:
        out = Path(output_dir) if output_dir is not None else Path(tmp)
        texts_a = generate_one(model_a, adapter_a, prompts, out / "responses_a.jsonl", dtype=dtype, **sampling)
        texts_b = generate_one(model_b, adapter_b, prompts, out / "responses_b.jsonl", dtype=dtype, **sampling)
        messages = [row["prompt"] for row in prompts]
        scores = score_unique(judge, messages + messages, texts_a + texts_b)
        scores_a, scores_b = scores[: len(prompts)], scores[len(prompts):]
        if output_dir is not None:
            atomic_write_jsonl(out / "scores.jsonl", (
                {"prompt_id": row["prompt_id"], "response_a": ta, "response_b": tb, "score_a": sa, "score_b": sb}
                for row, ta, tb, sa, sb in zip(prompts, texts_a, texts_b, scores_a, scores_b)))
    report = win_rate(scores_a, scores_b, n_boot=n_boot, seed=seed)
    report.update(length_controlled(scores_a, scores_b, [len(t) for t in texts_a], [len(t) for t in texts_b], n_boot, seed))
    report["a"] = {"model": model_a, "adapter": adapter_a and str(adapter_a), **_summary(scores_a, texts_a, n_boot, seed)}
    report["b"] = {"model": model_b, "adapter": adapter_b and str(adapter_b), **_summary(scores_b, texts_b, n_boot, seed)}
    return report


def run_models(run_dir: str | Path) -> tuple[RecipeConfig, str, dict[int, Path]]:
    """(run config, pi_init, {iteration: adapter dir}) of a run directory."""
    from selfie.rundir import load_run_config

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    base = str(run_dir / "init" / "model") if config.init else config.model.name
    adapters = {int(d.name[len("iter_"):]): d / "adapter" for d in sorted(run_dir.glob("iter_[0-9][0-9][0-9]"))
                if (d / "adapter" / "adapter_config.json").is_file()}
    if not adapters:
        raise SelfieError(f"{run_dir}: no finished adapters (iter_XXX/adapter) yet")
    return config, base, adapters


def run_scores(run_dir: str | Path, judge: Judge, prompts: list[dict], *, output_dir: str | Path | None = None,
               include_init: bool = True, max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 1.0,
               seed: int = 0, batch_size: int = 8, dtype: str = "auto", n_boot: int = 2000) -> dict[int, dict]:
    """Mean judge score of each iteration's policy on `prompts`: {iteration: {score_mean, ci95, n}}.

    Key INIT (-1) is pi_init itself (no adapter) when `include_init`. Responses go to
    `output_dir/responses_<label>.jsonl` when given.
    """
    _, base, adapters = run_models(run_dir)
    models: dict[int, Path | None] = ({INIT: None} if include_init else {}) | adapters
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size)
    messages = [row["prompt"] for row in prompts]
    results = {}
    with tempfile.TemporaryDirectory(prefix="selfie-eval-") as tmp:
        out = Path(output_dir) if output_dir is not None else Path(tmp)
        for iteration, adapter in models.items():
            texts = generate_one(base, adapter, prompts, out / f"responses_{iteration_label(iteration)}.jsonl", dtype=dtype, **sampling)
            results[iteration] = _summary(score_unique(judge, messages, texts), texts, n_boot, seed)
            logger.info("%s: mean score %.4f", iteration_label(iteration), results[iteration]["score_mean"])
    return results


def iteration_label(iteration: int) -> str:
    return "init" if iteration == INIT else f"iter_{iteration:03d}"


def _baseline_adapter(baseline: str, adapter: Path) -> Path | None:
    """The adapter the iteration is compared against (None = pi_init); adapter is RUN/iter_XXX/adapter."""
    iteration = int(adapter.parent.name[len("iter_"):])
    if baseline == "seed":
        return adapter.parent.parent / "iter_000" / "adapter"
    if baseline == "previous" and iteration > 0:
        return adapter.parent.parent / f"iter_{iteration - 1:03d}" / "adapter"
    return None


def eval_settings(eval_cfg: dict) -> dict:
    """The recipe's `eval:` mapping with its defaults; an unknown key, no judge or an unknown baseline is an error."""
    unknown = sorted(set(eval_cfg) - set(EVAL_DEFAULTS))
    if unknown:
        raise SelfieError(f"unknown recipe key 'eval.{unknown[0]}' (known: {', '.join(EVAL_DEFAULTS)})")
    cfg = {**EVAL_DEFAULTS, **{k: v for k, v in eval_cfg.items() if v is not None}}
    if not cfg["judge"]:
        raise SelfieError("recipe key 'eval.judge' is required when 'eval' is set (e.g. reward-model:PATH)")
    if cfg["baseline"] not in BASELINES:
        raise SelfieError(f"recipe key 'eval.baseline': unknown baseline '{cfg['baseline']}' ({', '.join(BASELINES)})")
    return cfg


def evaluate_iteration(eval_cfg: dict, pi_init: str, adapter: Path, config: RecipeConfig) -> dict:
    """The loop's eval stage: the iteration's policy against a baseline on held-out prompts, scored by eval.judge.

    Responses and per-prompt scores are kept in RUN/iter_XXX/eval/ for inspection.
    """
    cfg = eval_settings(eval_cfg)
    start = time.perf_counter()
    adapter = Path(adapter)
    prompts = eval_prompts(cfg["prompts"], cfg["split"] or config.data.split, cfg["num_prompts"], config)
    judge = load_judge(cfg["judge"], dtype=config.model.dtype)
    temperature = config.generate.temperature if cfg["temperature"] is None else cfg["temperature"]
    sampling = dict(max_new_tokens=cfg["max_new_tokens"], temperature=temperature, top_p=config.generate.top_p,
                    seed=config.seed, batch_size=config.generate.batch_size, dtype=config.model.dtype)
    out = adapter.parent / "eval"
    if cfg["baseline"] == "none":
        texts = generate_one(pi_init, adapter, prompts, out / "responses_a.jsonl", **sampling)
        summary = _summary(score_unique(judge, [row["prompt"] for row in prompts], texts), texts, cfg["n_boot"], config.seed)
        metrics = {"score_mean": summary["score_mean"], "score_ci95": summary["ci95"], "n": summary["n"],
                   "length_mean": summary["length_mean"]}
    else:
        report = compare_models(judge, pi_init, str(adapter), pi_init, _baseline_adapter(cfg["baseline"], adapter),
                                prompts, output_dir=out, n_boot=cfg["n_boot"], **sampling)
        metrics = {"score_mean": report["a"]["score_mean"], "baseline_score_mean": report["b"]["score_mean"],
                   "length_mean": report["a"]["length_mean"], "baseline_length_mean": report["b"]["length_mean"],
                   **{k: report[k] for k in ("win_rate", "ci95", "lc_win_rate", "lc_ci95", "wins", "ties", "losses", "n")}}
    return {"judge": cfg["judge"], "baseline": cfg["baseline"], **metrics, "seconds": round(time.perf_counter() - start, 2)}
