"""The validate stage's measures (docs/METHOD.md section 1.8): each iteration's policy pi_t on what no training saw.

Both are taken against pi_init, the implicit reward's reference, from one scoring pass of pi_t:
- preference, on the seed pairs the seed stage held out (`validation.pairs`): r = beta * (log pi_t - log pi_init)
  summed over each response; accuracy = share of pairs with r(chosen) > r(rejected) (ties count half), loss =
  DPO's -log sigmoid(r(chosen) - r(rejected)), each with a 95% bootstrap interval over the pairs, and the paired
  change of accuracy against the previous iteration's on the same pairs;
- drift, on one sample of pi_t per held-out prompt, drawn from pi_t itself (temperature 1, no nucleus cut): mean
  length in tokens and truncated share against pi_init's samples of the same prompts (drawn in iteration 0), and
  KL(pi_t || pi_init) estimated by the mean over the samples of log pi_t(y|x) - log pi_init(y|x) (the
  sequence-level KL's Monte Carlo estimate, unbiased for samples of pi_t).
The stop rule and the best iteration read these (selfie/run/guard.py).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence

import numpy as np

from selfie.config.schema import GenerateConfig, ValidationConfig
from selfie.data import count_or_fraction
from selfie.errors import SelfieError
from selfie.io import atomic_write_jsonl, read_jsonl
from selfie.labelling.signal import heldout_rows
from selfie.run.plan import VALIDATE
from selfie.run.rundir import RunContext
from selfie.stats import bootstrap_ci

SAMPLE, INIT_SAMPLE = "sample:", "init:"  # prompt_id prefixes of the drift samples in the stage's judgments


def held_out_count(validation: ValidationConfig, seed_pairs: int) -> int:
    """How many of `seed_pairs` pairs `validation.pairs` holds out (a fraction rounds down, but to at least one),
    leaving at least one to train on."""
    n = count_or_fraction(validation.pairs, seed_pairs, "validation.pairs")
    if validation.pairs < 1:
        n = max(n, 1)
    if not 1 <= n < seed_pairs:
        raise SelfieError(
            f"recipe key 'validation.pairs': {validation.pairs:g} of {seed_pairs} seed pairs holds out {n}; "
            f"it must hold out at least 1 and leave at least 1 to train on"
        )
    return n


def hold_out(ctx: RunContext) -> None:
    """Rank 0, in the seed stage before training: move `validation.pairs` of RUN/iter_000/pairs.jsonl (a seeded
    draw) into RUN/iter_000/validation_pairs.jsonl. The held-out file is written first and the pairs are then
    filtered by it, so a kill in between is mended by running again."""
    pairs = read_jsonl(ctx.pairs(0))
    if not ctx.validation_pairs.exists():
        order = list(range(len(pairs)))
        random.Random(ctx.config.seed).shuffle(order)
        held = sorted(order[: held_out_count(ctx.config.validation, len(pairs))])
        atomic_write_jsonl(ctx.validation_pairs, [pairs[i] for i in held])
    held_keys = {_pair_key(pair) for pair in read_jsonl(ctx.validation_pairs)}
    training = [pair for pair in pairs if _pair_key(pair) not in held_keys]
    if len(training) != len(pairs):
        atomic_write_jsonl(ctx.pairs(0), training)


def _pair_key(pair: dict) -> str:
    return json.dumps([pair["prompt"], pair["chosen"], pair["rejected"]], sort_keys=True)


def pair_rows(ctx: RunContext) -> list[dict]:
    """The held-out pairs as response rows, the gold chosen response first or second by a seeded coin (the
    label-signal check's rows: selfie/labelling/signal.py); none for a run whose seed stage held none out."""
    pairs = read_jsonl(ctx.validation_pairs) if ctx.validation_pairs.exists() else []
    return heldout_rows(pairs, range(len(pairs)), ctx.config.seed)


def drift_prompts(ctx: RunContext, held_out_prompts: Sequence[dict], pairs: Sequence[dict]) -> list[dict]:
    """The prompts sampled for drift: `validation.prompts` of the pool's held-out prompts, else the held-out pairs'."""
    wanted = ctx.config.validation.prompts
    rows = held_out_prompts[:wanted] if wanted else pairs
    return [{"prompt_id": row["prompt_id"], "prompt": row["prompt"]} for row in rows]


def policy_sampling(settings: GenerateConfig) -> GenerateConfig:
    """The drift samples' settings: the policy itself (temperature 1, no nucleus cut), so that the mean log-ratio of
    its samples estimates KL(pi_t || pi_init), which tempered samples would not; length and backend as generate:."""
    return dataclasses.replace(settings, temperature=1.0, top_p=1.0)


def as_scored(rows: Sequence[dict], prefix: str) -> list[dict]:
    """Sampled rows renamed for the stage's one scoring pass beside the pairs."""
    return [{**row, "prompt_id": prefix + row["prompt_id"]} for row in rows]


# ---- the measures, from the judgments (rank 0) ------------------------------------------------------


def preference(rows: Sequence[dict], judgments: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Per held-out pair: 1 / 0.5 / 0 as pi_t's implicit reward ranks the gold chosen response above / equal to /
    below the rejected one, and DPO's loss -log sigmoid(r_chosen - r_rejected)."""
    by_id = {j["prompt_id"]: j for j in judgments}
    margins = []
    for row in rows:
        rewards = by_id[row["prompt_id"]]["rewards"]
        margins.append(rewards[row["gold"]] - rewards[1 - row["gold"]])
    m = np.asarray(margins, dtype=float)
    return np.where(m > 0, 1.0, np.where(m == 0, 0.5, 0.0)), np.logaddexp(0.0, -m)


def drift(judgments: Sequence[dict], samples: Sequence[dict], prefix: str) -> dict:
    """Mean length (tokens), truncated share and per-sample log pi_t - log pi_init of the samples under `prefix`."""
    by_id = {j["prompt_id"]: j for j in judgments}
    scored = [by_id[prefix + row["prompt_id"]] for row in samples]
    return {
        "tokens": np.asarray([j["num_tokens"][0] for j in scored], dtype=float),
        "truncated": np.asarray([not row["finished"][0] for row in samples], dtype=float),
        "log_ratio": np.asarray([j["policy_logps"][0] - j["reference_logps"][0] for j in scored], dtype=float),
    }


def _mean_ci(values: np.ndarray, n_boot: int, seed: int) -> tuple[float | None, list[float] | None]:
    if not len(values):
        return None, None
    return float(values.mean()), bootstrap_ci(values, n_boot, seed)


def measures(
    validation: ValidationConfig,
    rows: Sequence[dict],
    judgments: Sequence[dict],
    samples: Sequence[dict],
    init: dict,
    previous: Sequence[dict] | None,
    seed: int,
) -> dict:
    """Iteration t's validation metrics: preference on the held-out pairs (`rows` as judged by pi_t), drift of
    pi_t's `samples` against pi_init's (`init`: drift() of pi_init's samples), and the accuracy's paired change
    against the previous iteration's (`previous`: its judgments of the same rows)."""
    n_boot = validation.n_boot
    hits, losses = preference(rows, judgments) if rows else (np.empty(0), np.empty(0))
    accuracy, accuracy_ci = _mean_ci(hits, n_boot, seed)
    loss, loss_ci = _mean_ci(losses, n_boot, seed)
    mine = drift(judgments, samples, SAMPLE)
    kl, kl_ci = _mean_ci(mine["log_ratio"], n_boot, seed)
    tokens, init_tokens = float(mine["tokens"].mean()), float(init["tokens"].mean())
    metrics = {
        "pairs": len(rows),
        "accuracy": accuracy,
        "accuracy_ci95": accuracy_ci,
        "loss": loss,
        "loss_ci95": loss_ci,
        "prompts": len(samples),
        "tokens_mean": tokens,
        "init_tokens_mean": init_tokens,
        "length_change": tokens / init_tokens - 1 if init_tokens else None,
        "truncated": float(mine["truncated"].mean()),
        "init_truncated": float(init["truncated"].mean()),
        "kl": kl,
        "kl_ci95": kl_ci,
    }
    if previous is not None and rows:
        before, _ = preference(rows, previous)
        change, change_ci = _mean_ci(hits - before, n_boot, seed)
        metrics.update(accuracy_change=change, accuracy_change_ci95=change_ci)
    return metrics


def recorded_best(ctx: RunContext) -> int | None:
    """The best iteration as the latest validate stage found it (None: the run does not validate, or no iteration
    passed every check)."""
    manifest = ctx.manifest()
    validated = [t for t in range(ctx.config.num_iterations + 1) if manifest.is_done(t, VALIDATE.name)]
    return ctx.read_metrics(validated[-1])[VALIDATE.name].get("best_iteration") if validated else None


def validation_line(v: dict) -> str:
    """One line for `selfie status`."""
    if v.get("skipped"):
        return f"validation: {v['skipped']}"
    parts = []
    if v.get("accuracy") is not None:
        low, high = v["accuracy_ci95"]
        parts.append(f"accuracy {v['accuracy']:.0%} [{low:.0%}, {high:.0%}] of {v['pairs']} held-out pairs, loss {v['loss']:.3f}")
    change = v.get("length_change")
    parts.append(
        f"length {v['tokens_mean']:.0f} tokens"
        + (f" ({change:+.0%} vs pi_init)" if change is not None else "")
        + f", {v['truncated']:.0%} truncated, KL {v['kl']:.3g}"
    )
    line = "validation: " + "; ".join(parts)
    return line + "".join(f"; FAILED: {reason}" for reason in v.get("failed", []))
