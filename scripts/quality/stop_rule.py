"""Does validation pick the better iteration? The stop rule and the best iteration against an independent scorer.

The set-up of scripts/quality/self_labels.py (SmolLM2-135M-Instruct + LoRA, the demo prompts cut by the loop's
split, the relevance scorer as gold, a 40-prompt seed labelled by it), with the recipe's `validation:` section:
`pairs` of the gold seed pairs held out of training, drift sampled on `drift_prompts` of the pool's held-out
prompts, the default bounds, but `stop: false`, so every iteration runs and the rule's verdicts are only recorded.
Per training seed: the seed stage and 2 self-labelled iterations under the recipe's label rules (penalize + auto),
then each iteration's policy (0, 1, 2) answers the held-out prompts `samples` times and the scorer scores them.

Reported per seed: each iteration's scorer score beside its validation figures; the scorer's best iteration; the
rule's pick (the iteration the loop would stop after under `stop: true`, and the best iteration it would export
there) and "always the last"; each pick's score against the scorer's best (paired by prompt). Over every
(seed, iteration): the rank correlation of validation accuracy, loss, length change and KL with the scorer's score.

    python -m scripts.quality.stop_rule [--training-seeds 42 43] [--quick]

Results: docs/BENCHMARKS.md "Validation and the stop rule" and docs/bench/stop_rule.json. Run alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from selfie.config.schema import JudgeConfig
from selfie.run.guard import best_iteration

from scripts.benchlib import docs_dir, measure_or_load, write_section
from scripts.quality.benchmark import _ci, evaluate, paired, recipe, run, scored
from scripts.quality.self_labels import setup

SIZES = {"seed": 40, "iterations": [64, 64], "held_out": 100, "max_new_tokens": 96, "samples": 2, "pairs": 8, "drift_prompts": 32}
QUICK = {"seed": 8, "iterations": [6, 6], "held_out": 6, "max_new_tokens": 16, "samples": 2, "pairs": 2, "drift_prompts": 4}
SPA_RULES = {"truncated": JudgeConfig.truncated, "length_penalty": JudgeConfig.length_penalty, "signal_folds": 0}
FIGURES = ("accuracy", "loss", "length_change", "kl")  # the validation figures set against the scorer


def one_seed(args, work: Path, training_seed: int, held_out: list[dict], judge) -> dict:
    """One training seed's run (stop rule recorded, not acted on) and every iteration's scorer score."""
    work = work / f"seed-{training_seed}"
    validation = {"pairs": args.pairs, "prompts": args.drift_prompts, "n_boot": args.n_boot, "stop": False}
    values = recipe(args, work, "spa", num_iterations=2, seed=training_seed, judge=SPA_RULES, validation=validation)
    ctx, seconds = run(values)
    validated = {t: ctx.read_metrics(t)["validate"] for t in range(3)}
    arms = {t: evaluate(work, f"iteration-{t}", ctx.adapter(t), held_out, args, judge, samples=args.samples) for t in validated}
    scorer_best = max(arms, key=lambda t: scored(arms[t], args.n_boot)["score_mean"])
    stopped = next((t for t, v in validated.items() if v["failed"]), None)
    stop_at = 2 if stopped is None else stopped
    # what `selfie export` takes: the best recorded where the loop stops, else the last completed iteration
    rule_pick = best_iteration({t: validated[t] for t in range(stop_at + 1)})
    rule_pick = stop_at if rule_pick is None else rule_pick
    return {
        "iterations": {
            str(t): {**scored(arms[t], args.n_boot), "validation": validated[t], "eval_seconds": arms[t]["seconds"]} for t in arms
        },
        "scorer_best": scorer_best,
        "stops_after": stopped,
        "rule_pick": rule_pick,
        "last": 2,
        "rule_vs_scorer_best": paired(arms[rule_pick], arms[scorer_best], args.n_boot),
        "last_vs_scorer_best": paired(arms[2], arms[scorer_best], args.n_boot),
        "rule_vs_last": paired(arms[rule_pick], arms[2], args.n_boot),
        "run_minutes": seconds / 60,
        "validate_minutes": sum(ctx.read_metrics(t)["times"]["validate"] for t in range(3)) / 60,
    }


def rank_correlations(seeds: dict) -> dict:
    """Spearman's rho of each validation figure with the scorer's score over every (seed, iteration)."""
    points = [it for r in seeds.values() for it in r["iterations"].values()]
    score = np.argsort(np.argsort([p["score_mean"] for p in points]))
    rho = {}
    for figure in FIGURES:
        values = [p["validation"].get(figure) for p in points]
        if any(v is None for v in values):
            rho[figure] = None
            continue
        ranks = np.argsort(np.argsort(values))
        rho[figure] = float(np.corrcoef(ranks, score)[0, 1])
    return {"points": len(points), "spearman": rho}


def measure(args: argparse.Namespace, work: Path, held_out: list[dict], judge) -> dict:
    seeds = {str(s): one_seed(args, work, s, held_out, judge) for s in args.training_seeds}
    return {
        "sizes": {k: getattr(args, k) for k in SIZES},
        "scorer": args.scorer,
        "seeds": seeds,
        "agreement": {
            "rule": sum(r["rule_pick"] == r["scorer_best"] for r in seeds.values()),
            "last": sum(r["last"] == r["scorer_best"] for r in seeds.values()),
            "seeds": len(seeds),
        },
        "correlation": rank_correlations(seeds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--training-seeds", type=int, nargs="+", default=[42, 43], help="the recipe's seed, one run each")
    args, work, held_out, judge = setup(parser, SIZES, QUICK, "/tmp/selfie-bench-stop-rule")
    results = measure_or_load(args, "stop_rule", lambda args: measure(args, work, held_out, judge))
    write_section("Validation and the stop rule", report(results))
    print(report(results))
    print(f"written to {docs_dir()}")


def _validation_cells(v: dict) -> str:
    low, high = v["accuracy_ci95"]
    return (
        f"{v['accuracy']:.0%} [{low:.0%}, {high:.0%}] | {v['loss']:.3f} | {v['length_change']:+.0%} | {v['kl']:.2f} "
        f"| {'; '.join(v['failed']) or '-'}"
    )


def report(results: dict) -> str:
    sizes, agreement, corr = results["sizes"], results["agreement"], results["correlation"]
    lines = [
        f'`python -m scripts.quality.stop_rule` on {results["machine"]}: the set-up of "Self-labels end to end" (a seed of '
        f"{sizes['seed']} prompts labelled by the scorer, iterations {sizes['iterations']} prompts, {sizes['held_out']} "
        f"held-out prompts answered {sizes['samples']} times, {sizes['max_new_tokens']} new tokens) with `validation: "
        f"{{pairs: {sizes['pairs']}, prompts: {sizes['drift_prompts']}, stop: false}}` (the default bounds: length "
        "+-30% of pi_init's, no KL bound), so every iteration runs and the rule's verdicts are recorded. The rule's "
        "pick is what `selfie export` would take had the loop stopped where the rule says (the best validated "
        "iteration there); differences are paired by prompt, 95% bootstrap intervals."
    ]
    for seed, r in results["seeds"].items():
        stops = "never stops" if r["stops_after"] is None else f"stops after iteration {r['stops_after']}"
        lines += [
            "",
            f"Training seed {seed} (run {r['run_minutes']:.1f} min, of it validation {r['validate_minutes']:.1f}): the "
            f"scorer's best is iteration {r['scorer_best']}; the rule {stops} and picks {r['rule_pick']}.",
            "",
            "| iteration | scorer score | 95% CI | mean length (chars) | validation accuracy [95% CI] | loss | length vs pi_init "
            "| KL | failed checks |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for t, it in r["iterations"].items():
            lines.append(
                f"| {t} | {it['score_mean']:.4f} | [{it['ci95'][0]:.4f}, {it['ci95'][1]:.4f}] | {it['length_mean']:.0f} "
                f"| {_validation_cells(it['validation'])} |"
            )
        lines.append("")
        for name, key in (
            ("the rule's pick against the scorer's best", "rule_vs_scorer_best"),
            ("always the last against the scorer's best", "last_vs_scorer_best"),
            ("the rule's pick against always the last", "rule_vs_last"),
        ):
            lines.append(f"- {name}: {r[key]['diff']:+.4f} {_ci(r[key]['ci95'])}")
    rho = ", ".join(f"{k} {'-' if v is None else f'{v:+.2f}'}" for k, v in corr["spearman"].items())
    lines += [
        "",
        f"The rule picked the scorer's best iteration on {agreement['rule']} of {agreement['seeds']} training seeds, "
        f'"always the last" on {agreement["last"]}. Rank correlation with the scorer\'s score over {corr["points"]} '
        f"(seed, iteration) points: {rho}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
