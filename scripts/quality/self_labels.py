"""Do SPA's self-labels make the model better? SPA end to end against seed-only and all-gold DPO, per training seed.

The quality benchmark's set-up (scripts/quality/benchmark.py: SmolLM2-135M-Instruct + LoRA, the demo prompts cut
by the loop's split, the relevance scorer as gold), sized like the label lab (a 40-prompt gold seed), with:
- gold labels made under `judge.truncated: keep` (the scorer's own preference: no truncation rule over it);
- every held-out prompt answered `samples` times (fixed seeds, the same for every arm), scored by their mean;
- the check first: all-gold DPO against seed-only DPO, whose gap SPA is to close;
- the label-signal check of each lever (the run's own code: selfie/run/labellers.py), before any iteration;
- the first training seed with every arm, each further seed with the `--repeat` levers.

Arms per training seed: seed-only DPO (the gold seed), all-gold DPO (gold labels for every training prompt), SPA 1 / 2
with each lever (the recipe's label rules plus the lever's judge keys; iterations self-labelled); on the first seed also
shipped and gold-iterative 1 / 2 (the same loop labelled by the scorer; --final-only: SPA 2 alone, no gold-iterative
arms). Under positivity the same answers are also scored by relevance. Differences are paired by prompt, intervals are
95% bootstrap over the held-out prompts.

    python -m scripts.quality.self_labels [--training-seeds 42 43] [--levers default ensemble-unanimous] [--final-only] [--quick]

Results: docs/BENCHMARKS.md "Self-labels end to end" and docs/bench/self_labels.json. Run alone. --gap-only on one
training seed took 30 minutes on 2 cores (the all-gold run 19 of them); every SPA arm adds two iterations and their
evaluations.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from selfie.config.loader import load_recipe
from selfie.config.schema import JudgeConfig
from selfie.data import load_prompts, split_prompts
from selfie.dist import Ranks, process_state
from selfie.evaluation.judges import Judge, load_judge
from selfie.run.context import StageContext
from selfie.run.labellers import label_signal, labeller_for
from selfie.run.rundir import RunContext

from scripts.benchlib import docs_dir, machine, parse_args, save_raw, write_section
from scripts.quality.benchmark import _ci, _lr, _pct, evaluate, label_report, paired, recipe, rescore, run, score_cells, scored
from scripts.quality.label_lab import labeller_context, measured
from scripts.quality.lever_lab import ALL_LINEAR
from scripts.quality.scorer import DESCRIBED, SCORERS, add_scorer_arg, gold_of

SIZES = {"seed": 40, "iterations": [64, 64], "held_out": 100, "max_new_tokens": 96, "samples": 2, "learning_rate": 2e-4}
QUICK = {"seed": 6, "iterations": [6, 6], "held_out": 6, "max_new_tokens": 16, "samples": 2, "learning_rate": 2e-4}
# positivity: every held-out prompt the split leaves (132) answered 4 times in 64 tokens, and training 5x harder: at
# lr 2e-4 all-gold DPO moved the score by 0.03, about 0.6 half-widths (docs/BENCHMARKS.md)
SCORER_SIZES = {"relevance": {}, "positivity": {"held_out": 132, "max_new_tokens": 64, "samples": 4, "learning_rate": 1e-3}}
GOLD_RULES = {"truncated": "keep", "length_penalty": 0.0, "signal_folds": 0}  # the check runs under each lever's rules
CROSS_CHECK = {"positivity": "relevance"}  # the scorer that scores the same answers beside the gold one
SPA_RULES = {"truncated": JudgeConfig.truncated, "length_penalty": JudgeConfig.length_penalty, "signal_folds": 0}
LEVERS = {  # recipe sections over the recipe's rules (docs/BENCHMARKS.md "Label lab", "Lever lab")
    "default": {},
    "ensemble-unanimous": {"judge": {"labeller": "ensemble", "ensemble_size": 3, "min_agreement": 1.0}},
    "consistency-unanimous": {"judge": {"labeller": "consistency", "min_agreement": 1.0, "signal_folds": 2}},
    "consistency-soft": {"judge": {"labeller": "consistency", "signal_folds": 2}, "refine": {"soft_agreement": True}},
    "anchored": {"judge": {"anchored": True}},
    # the seed stage's levers (their own seed run): the lab's candidates (scripts/quality/lever_lab.py)
    "seed-lr-3e-3": {"seed": {"train": {"learning_rate": 3e-3}}},
    "seed-all-linear": {"seed": {"lora": {"target_modules": ALL_LINEAR}}},
    "seed-best-of-4": {"seed": {"data": {"seed_samples": 4}}},
}


def spa_run(
    args, work: Path, seed_run: RunContext, name: str, training_seed: int, lever: dict, check: StageContext
) -> tuple[RunContext, float]:
    """Two self-labelled iterations continuing a copy of the seed run. A labeller fitted in the seed stage (the
    ensemble's members) is fitted into the copy first, by the seed stage's own code, on the same seed pairs; the
    check's kept fold adapters (the consistency labeller's) are copied in."""
    judge, refine = {**SPA_RULES, **lever.get("judge", {})}, lever.get("refine", {})
    values = recipe(args, work, name, num_iterations=2, seed=training_seed, judge=judge, refine=refine)
    ctx = RunContext.for_recipe(load_recipe(None, values))
    fit, start = labeller_for(ctx.config.judge.labeller).fit, time.perf_counter()
    if not ctx.run_dir.exists() and (fit or check.fold_adapters.exists()):
        shutil.copytree(seed_run.run_dir, ctx.run_dir)
        if check.fold_adapters.exists():
            shutil.copytree(check.fold_adapters, ctx.fold_adapters)
        if fit:
            fit(StageContext(ctx.config, ctx.run_dir, Ranks(process_state())))
    fit_seconds = time.perf_counter() - start
    spa, seconds = run(values, seed_run)
    return spa, seconds + fit_seconds


def evaluate_arm(work: Path, name: str, adapter: Path | None, held_out, args, judge) -> dict:
    """An arm's answers scored by the gold scorer and, under positivity, the same answers by relevance as
    `cross_scores`: a gain in tone bought with answers that no longer address the prompt shows there."""
    arm = evaluate(work, name, adapter, held_out, args, judge, samples=args.samples)
    if args.scorer not in CROSS_CHECK:
        return arm
    cross = CROSS_CHECK[args.scorer]
    return {**arm, "cross_scores": rescore(work, name, held_out, args.samples, load_judge(SCORERS[cross]), cross)}


def one_seed(args, work: Path, training_seed: int, levers: list[str], first: bool, held_out, judge, shipped) -> dict:
    """Every arm of one training seed, each paired against that seed's seed-only DPO."""
    work = work / f"seed-{training_seed}"

    def evaluated(name: str, adapter: Path) -> dict:
        return evaluate_arm(work, name, adapter, held_out, args, judge)

    seed_run, seed_seconds = run(recipe(args, work, "seed", seed=training_seed, judge=GOLD_RULES))
    arms = {"seed-only DPO": evaluated("seed-only", seed_run.adapter(0))}
    everything = args.seed + sum(args.iterations)
    all_gold, gold_seconds = run(
        recipe(
            args, work, "all-gold", seed=training_seed, judge=GOLD_RULES, data={"seed_size": everything, "iteration_sizes": []}
        )
    )
    arms["all-gold DPO"] = evaluated("all-gold", all_gold.adapter(0))
    minutes = {"seed run": seed_seconds / 60, "all-gold run": gold_seconds / 60}
    if first and not args.final_only:
        gold_iter, seconds = run(
            recipe(
                args,
                work,
                "gold-iterative",
                num_iterations=2,
                seed=training_seed,
                judge={**GOLD_RULES, "labeller": gold_of(args)},
            ),
            seed_run,
        )
        minutes["gold-iterative runs"] = seconds / 60
        arms |= {f"gold-iterative {t}": evaluated(f"gold-iterative-{t}", gold_iter.adapter(t)) for t in (1, 2)}
    lever_rows = {}
    for lever in levers:
        lever_seed = seed_run
        if "seed" in LEVERS[lever]:  # a lever of the seed stage: its own seed run and seed-only arm
            lever_seed, _ = run(
                recipe(args, work, f"seed-{lever}", seed=training_seed, judge=GOLD_RULES, **LEVERS[lever]["seed"])
            )
            arms[f"seed-only DPO ({lever})"] = evaluated(f"seed-only-{lever}", lever_seed.adapter(0))
        rules = {**SPA_RULES, **LEVERS[lever].get("judge", {}), "signal_folds": 2}
        check_ctx = labeller_context(lever_seed, work / lever, rules.pop("labeller", "implicit"), **rules)
        times: dict[str, float] = {}
        signal = measured(times, "check", work / lever / "signal.json", lambda ctx=check_ctx: label_signal(ctx))
        spa, seconds = spa_run(args, work, lever_seed, f"spa-{lever}", training_seed, LEVERS[lever], check_ctx)
        evaluated_iterations = (2,) if args.final_only else (1, 2)
        arms |= {f"SPA {t} ({lever})": evaluated(f"spa-{lever}-{t}", spa.adapter(t)) for t in evaluated_iterations}
        lever_rows[lever] = {
            "label_signal": signal,
            "labels": label_report(spa, judge),
            "minutes": {"label-signal check": times["check"] / 60, "2 iterations": seconds / 60},
        }
    baseline = arms["seed-only DPO"]
    if shipped is not None:
        arms = {"shipped": shipped, **arms}
    summary = {
        name: {**scored(arm, args.n_boot), "vs_seed_only": paired(arm, baseline, args.n_boot)} for name, arm in arms.items()
    }
    for name, arm in arms.items():
        if "cross_scores" in arm:
            cross, cross_baseline = {"scores": arm["cross_scores"]}, {"scores": baseline["cross_scores"]}
            summary[name]["cross"] = {
                "mean": float(np.mean(arm["cross_scores"])),
                "vs_seed_only": paired(cross, cross_baseline, args.n_boot),
            }
    gap = summary["all-gold DPO"]["vs_seed_only"]
    for lever, row in lever_rows.items():  # the share of the gap closed is defined only when the gap is shown
        closed = summary[f"SPA 2 ({lever})"]["vs_seed_only"]["diff"]
        row["gap_closed"] = closed / gap["diff"] if gap["ci95"][0] > 0 else None
        if lever != "default" and "default" in lever_rows:  # what turning the lever on changes, prompt by prompt
            row["vs_default"] = paired(arms[f"SPA 2 ({lever})"], arms["SPA 2 (default)"], args.n_boot)
    minutes["evaluations"] = sum(arm["seconds"] for arm in arms.values()) / 60
    return {"arms": summary, "levers": lever_rows, "minutes": minutes}


def setup(
    parser: argparse.ArgumentParser, sizes: dict, quick: dict, work: str
) -> tuple[argparse.Namespace, Path, list[dict], Judge]:
    """A benchmark of this set-up from its arguments: them, its work directory, the held-out prompts (the rest of the
    demo prompts after the loop's split) and the scorer."""
    parser.add_argument("--work", default=work, help="run directories and cached answers")
    parser.add_argument("--n-boot", type=int, default=2000)
    add_scorer_arg(parser)
    parser.set_defaults(**sizes)
    args = parse_args(parser, quick)
    if not args.quick:
        vars(args).update(SCORER_SIZES[args.scorer])
    held_out = split_prompts(load_prompts("demo"), args.seed, args.iterations, 42).held_out[: args.held_out]
    work = Path(args.work) / args.scorer / ("quick" if args.quick else "full")
    return args, work, held_out, load_judge(gold_of(args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--training-seeds", type=int, nargs="+", default=[42, 43], help="the recipe's seed, one set of runs each")
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS), help="SPA arms on the first seed")
    parser.add_argument("--repeat", nargs="+", default=["default"], choices=list(LEVERS), help="SPA arms on the other seeds")
    parser.add_argument(
        "--gap-only", action="store_true", help="only the check: shipped, seed-only and all-gold DPO on each training seed"
    )
    parser.add_argument(
        "--final-only",
        action="store_true",
        help="evaluate SPA's second iteration only and leave out the gold-iterative arms (at positivity's sizes an "
        "evaluation takes about 7 minutes)",
    )
    args, work, held_out, judge = setup(parser, SIZES, QUICK, "/tmp/selfie-bench-self-labels")
    shipped = evaluate_arm(work, "shipped", None, held_out, args, judge)
    seeds = {}
    for i, training_seed in enumerate(args.training_seeds):
        levers = [] if args.gap_only else args.levers if i == 0 else args.repeat
        first = i == 0 and not args.gap_only  # the gold-iterative arms
        seeds[str(training_seed)] = one_seed(
            args, work, training_seed, levers, first, held_out, judge, shipped if i == 0 else None
        )
    results = {
        "command": " ".join(["python -m scripts.quality.self_labels", *sys.argv[1:]]),
        "machine": machine(),
        "sizes": {k: getattr(args, k) for k in SIZES},
        "held_out_prompts": len(held_out),
        "scorer": args.scorer,
        "levers": {} if args.gap_only else {name: LEVERS[name] for name in dict.fromkeys([*args.levers, *args.repeat])},
        "seeds": seeds,
    }
    save_raw(raw_name(args.scorer), results)
    write_section(section(args.scorer), report(results))
    print(report(results))
    print(f"written to {docs_dir()}")


def raw_name(scorer: str) -> str:
    return "self_labels" if scorer == "relevance" else f"self_labels_{scorer}"


def section(scorer: str) -> str:
    return "Self-labels end to end" if scorer == "relevance" else f"Self-labels end to end: {scorer}"


def range_ratio(gap: dict) -> float:
    """All-gold minus seed-only DPO in half-widths of its interval: the range a labelling lever has to show in."""
    return gap["diff"] / ((gap["ci95"][1] - gap["ci95"][0]) / 2)


def _verdict(v: dict) -> str:
    return "above" if v["ci95"][0] > 0 else "below" if v["ci95"][1] < 0 else "within noise of"


def _versus(v: dict | None) -> str:
    return "-" if v is None else f"{v['diff']:+.4f} {_ci(v['ci95'])}"


def _cross_cells(arm: dict) -> str:
    if "cross" not in arm:
        return ""
    v = arm["cross"]["vs_seed_only"]
    return f" {arm['cross']['mean']:.4f} | {v['diff']:+.4f} | {_ci(v['ci95'])} |"


def report(results: dict) -> str:
    sizes, scorer = results["sizes"], results["scorer"].rsplit(":", 1)[-1]
    lines = [
        f"`{results['command']}` on {results['machine']}: SmolLM2-135M-Instruct (float32) + LoRA r 16, the "
        f"demo prompts cut by the loop's split (a seed of {sizes['seed']} prompts labelled by the scorer under "
        f"`judge.truncated: keep`, iterations {sizes['iterations']} prompts, {results['held_out_prompts']} held-out "
        f"prompts), {sizes['max_new_tokens']} new tokens, lr {_lr(sizes.get('learning_rate', 2e-4))}, seed 2 epochs, iterations 1 epoch, SPA under the "
        f"recipe's label rules (penalize + auto). Scorer: {DESCRIBED[scorer]}. Each "
        f"arm answers every held-out prompt {sizes['samples']} times (the same sampling seeds for every arm); a prompt "
        "scores its answers' mean; differences to the same training seed's seed-only DPO are paired by prompt; 95% "
        "bootstrap intervals over the prompts. Levers: "
        + "; ".join(f"`{name}` {rules or 'the recipe as it is'}" for name, rules in results["levers"].items())
        + "."
    ]
    cross = CROSS_CHECK.get(scorer)
    cross_header = f" {cross} of the same answers | vs seed-only DPO | 95% CI |" if cross else ""
    for seed, r in results["seeds"].items():
        lines += [
            "",
            f"Training seed {seed} (minutes: {', '.join(f'{k} {v:.1f}' for k, v in r['minutes'].items())}):",
            "",
            "| arm | mean score | 95% CI | mean length (chars) | vs seed-only DPO | 95% CI |" + cross_header,
            "|---|---|---|---|---|---|" + "---|" * cross_header.count("|"),
        ]
        for name, a in r["arms"].items():
            v = a["vs_seed_only"]
            lines.append(f"| {name} | {score_cells(a)} | {v['diff']:+.4f} | {_ci(v['ci95'])} |" + _cross_cells(a))
        lines += (
            []
            if not r["levers"]
            else [
                "",
                "| lever | label-signal check beforehand | pairs (it. 1 / 2) | agree with scorer (it. 1 / 2) "
                "| SPA 2 vs seed-only DPO | SPA 2 closes of the gap | SPA 2 vs SPA 2 (default) | minutes (check, iterations) |",
                "|---|---|---|---|---|---|---|---|",
            ]
        )
        for lever, row in r["levers"].items():
            s, labels = row["label_signal"], row["labels"]
            v = r["arms"][f"SPA 2 ({lever})"]["vs_seed_only"]
            lines.append(
                f"| {lever} | {s['accuracy']:.1%} [{s['ci95_low']:.1%}, {s['ci95_high']:.1%}] of {s['n']} "
                f"| {' / '.join(str(x['pairs']) for x in labels)} | {' / '.join(_pct(x['gold_agreement']) for x in labels)} "
                f"| {_verdict(v)} ({v['diff']:+.4f}) | {_pct(row['gap_closed'])} | {_versus(row.get('vs_default'))} "
                f"| {row['minutes']['label-signal check']:.1f}, {row['minutes']['2 iterations']:.1f} |"
            )
        gap = r["arms"]["all-gold DPO"]["vs_seed_only"]
        lines += [
            "",
            f"All-gold DPO is {_verdict(gap)} seed-only DPO ({gap['diff']:+.4f}, {_ci(gap['ci95'])}): "
            f"{range_ratio(gap):.1f} times the interval's half-width.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
