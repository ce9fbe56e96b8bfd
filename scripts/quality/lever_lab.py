"""Which levers make the self-labels carry the seed's preference? Issue 37's lab, under a scorer with range.

The set-up of "Self-labels end to end" under a chosen gold scorer (default positivity): a 40-prompt seed labelled by
the scorer (2 samples of pi_init per prompt, `judge.truncated: keep`), SmolLM2-135M-Instruct + LoRA r 16, seed DPO 2
epochs at lr 1e-3. pi_0 samples 2 responses per lab prompt (every prompt of the pool outside the seed slice, up to
`--lab-prompts`), pi_init one more (the anchor, adapter off), once; every labeller scores those same responses and
the recipe's pair rules (penalize + auto) make its pair per prompt. A pair agrees when the gold scorer prefers its
chosen response (a tie counts half). Levers, each a recipe key:

- consistency (`judge.labeller: consistency`): pi_0 and the label-signal check's two fold adapters, their mean reward;
  the pairs all three rank alike (`judge.min_agreement: 1`), two of three (0.6), or every pair on its soft label C
  (`refine.soft_agreement`: its agreement with gold counts C when gold agrees, 1 - C when not);
- the seed labeller: seed adapters trained with another learning rate or with LoRA on every linear layer
  (`train.seed_candidates`), each judging the lab's responses with its implicit reward; which one the label-signal
  check picks (the run's own code: selfie/run/seed_choice.py) and each candidate's check beside its lab agreement;
- a judged seed's best against worst of 4 samples (`data.seed_samples: 4`), its seed adapter judging likewise;
- anchored rejection (`judge.anchored`): pi_0's better response (by the default labeller) against pi_init's.

Each lever's agreement is paired by prompt against the default (pi_0's implicit reward, summed, K = 2) on the prompts
both keep; 95% bootstrap intervals over prompts; the share of prompts kept and the kept pairs' mean gold margin.

    python -m scripts.quality.lever_lab [--scorer positivity] [--quick]

Results: docs/BENCHMARKS.md "Lever lab" and docs/bench/lever_lab.json. Run alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import numpy as np

from selfie.data import load_prompts, split_prompts
from selfie.dist import Ranks, process_state
from selfie.generation.generate import generate_responses, load_generator
from selfie.io import read_jsonl
from selfie.run.context import StageContext
from selfie.run.labellers import label_signal
from selfie.run.seed_choice import choose_seed_training
from selfie.run.stages import anchor_seed, with_anchors

from scripts.benchlib import docs_dir, machine, parse_args, save_raw, write_section
from scripts.quality.benchmark import _lr, recipe, run
from scripts.quality.label_lab import (
    RULES,
    _pct,
    agreement,
    by_response,
    first,
    gold_scores,
    implicit_scores,
    labeller_context,
    measured,
    sample,
    summary,
)
from scripts.quality.scorer import DESCRIBED, add_scorer_arg, gold_of

# the set-up of "Self-labels end to end: positivity" (scripts/quality/self_labels.py SCORER_SIZES), so its seed run is
# the same recipe as that benchmark's first training seed
SIZES = {"seed": 40, "iterations": [64, 64], "lab_prompts": 192, "max_new_tokens": 64, "responses": 2, "learning_rate": 1e-3}
QUICK = {"seed": 8, "iterations": [6, 6], "lab_prompts": 8, "max_new_tokens": 16, "responses": 2, "learning_rate": 1e-3}
GOLD_RULES = {"truncated": "keep", "length_penalty": 0.0, "signal_folds": 0}  # the seed's gold labels, as self_labels
SPA_RULES = {"truncated": RULES.truncated, "length_penalty": RULES.length_penalty, "signal_folds": 2}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CANDIDATES = {  # train.seed_candidates: the settings the check chooses among, besides the recipe's own
    "seed lr 3e-3": {"learning_rate": 3e-3},
    "seed all linear layers": {"target_modules": ALL_LINEAR},
}
SEED_SAMPLES = 4  # data.seed_samples of the best-vs-worst seed
CONSISTENCY = {"consistency, min_agreement 1": 1.0, "consistency, min_agreement 0.6": 0.6}


def candidate_sections(candidate: dict) -> dict:
    """A seed candidate's settings as the recipe sections `recipe()` takes."""
    train = {k: v for k, v in candidate.items() if k != "target_modules"}
    return {"train": train} if train else {"lora": {"target_modules": candidate["target_modules"]}}


def anchored_rows(work: Path, seed_run, rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """The lab's rows with pi_init's sample of each prompt appended as its anchor (drawn as iteration 1's would be)."""
    out = work / "anchor_responses.jsonl"
    if not out.exists():
        model, tokenizer = load_generator(seed_run.pi_init, None, "float32", "auto", "cpu")
        prompts = [{"prompt_id": row["prompt_id"], "prompt": row["prompt"]} for row in rows]
        generate_responses(
            model, tokenizer, prompts, out, num_responses=1, max_new_tokens=args.max_new_tokens, temperature=0.7,
            seed=anchor_seed(seed_run.config.seed, 1), batch_size=64,
        )  # fmt: skip
    return with_anchors(rows, read_jsonl(out))


def choice_context(seed_run, work: Path) -> StageContext:
    """The default seed run's pairs under a recipe with train.seed_candidates and the consistency labeller: where the
    run's own code chooses, and keeps each candidate's fold adapters."""
    config = seed_run.config
    config = dataclasses.replace(
        config,
        judge=dataclasses.replace(config.judge, labeller="consistency", **SPA_RULES),
        train=dataclasses.replace(config.train, seed_candidates=list(CANDIDATES.values())),
    )
    ctx = StageContext(config, work / "choice", Ranks(process_state()))
    if not ctx.pairs(0).exists():
        ctx.pairs(0).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(seed_run.pairs(0), ctx.pairs(0))
    return ctx


def fold_adapters(ctx: StageContext, choice: dict) -> Path:
    """Candidate 0's fold adapters: moved to the run's own place when the check chose it, else in its check's."""
    own = ctx.iteration_dir(0) / "seed_candidates" / "candidate_0" / "iter_000" / ctx.fold_adapters.name
    return ctx.fold_adapters if choice["chosen"] == 0 else own


def soft_summary(result: dict, baseline: list[float | None]) -> dict:
    """Agreement of pairs trained on their soft label C: C when gold agrees, 1 - C when it does not."""
    soft = [None if o is None else c * o + (1 - c) * (1 - o) for o, c in zip(result["outcome"], result["labeller_agreement"])]
    return summary(soft, baseline)


def margin_of(result: dict) -> float:
    values = [m for m in result["gold_margin"] if m is not None]
    return float(np.mean(values)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/selfie-lever-lab", help="the seed runs, responses and scores")
    add_scorer_arg(parser)
    parser.set_defaults(**SIZES, scorer="positivity")
    args = parse_args(parser, QUICK)
    work = Path(args.work) / args.scorer / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    seed_run, _ = run(recipe(args, work, "seed", judge=GOLD_RULES))
    splits = split_prompts(load_prompts("demo"), args.seed, args.iterations, 42)
    prompts = [*splits.iterations[0], *splits.iterations[1], *splits.held_out][: args.lab_prompts]
    plain = measured(times, "sampling pi_0", work / "sampling.json", lambda: sample(work, seed_run, prompts, args))
    rows = measured(
        times, "sampling pi_init (anchors)", work / "anchors.json", lambda: anchored_rows(work, seed_run, plain, args)
    )
    gold = by_response(rows, measured(times, "gold scoring", work / "gold.json", lambda: gold_scores(rows, gold_of(args))))
    beta = seed_run.config.train.beta

    def scores_of(name: str, run_ctx, adapter: Path) -> dict:
        return measured(
            times, f"{name}: scoring", work / f"scores-{name}.json", lambda: implicit_scores(run_ctx, adapter, rows, beta)
        )

    # the check of every seed training (the run's own choice among them); the recipe's own is candidate 0, whose
    # fold adapters are the consistency labeller's members beside pi_0
    choice_ctx = choice_context(seed_run, work)
    choice = measured(
        times, "label-signal checks, choice of seed training", work / "choice.json", lambda: choose_seed_training(choice_ctx)[1]
    )
    signals = {name: c["label_signal"] for name, c in zip(["default", *CANDIDATES], choice["candidates"])}
    default = scores_of("default", seed_run, seed_run.adapter(0))
    folds = [scores_of(f"fold {k}", seed_run, fold_adapters(choice_ctx, choice) / f"fold_{k}" / "adapter") for k in range(2)]

    # the seed labellers: each candidate's own seed run
    seeds = {"default": default}
    for name, candidate in CANDIDATES.items():
        variant, _ = run(recipe(args, work, name.replace(" ", "-"), judge=GOLD_RULES, **candidate_sections(candidate)))
        seeds[name] = scores_of(name, variant, variant.adapter(0))
    best_of = f"seed best-vs-worst of {SEED_SAMPLES}"
    best_run, _ = run(recipe(args, work, "seed-best-of", judge=GOLD_RULES, data={"seed_samples": SEED_SAMPLES}))
    seeds[best_of] = scores_of(best_of, best_run, best_run.adapter(0))
    best_ctx = labeller_context(best_run, work / "best-of", "implicit", **SPA_RULES)
    signals[best_of] = measured(
        times, f"{best_of}: label-signal check", work / "signal-best-of.json", lambda: label_signal(best_ctx)
    )

    lengths = default["num_tokens"]
    two = lambda values, members=None: first(plain, values, lengths, 2, members)  # noqa: E731 (the anchors cut off)
    results = {name: agreement(*two(s["summed"]), gold) for name, s in seeds.items()}
    members = [list(m) for m in zip(default["summed"], folds[0]["summed"], folds[1]["summed"])]  # [prompt][member]
    mean = [[sum(v) / len(v) for v in zip(*per_prompt)] for per_prompt in members]
    consistency_rules = dataclasses.replace(RULES, labeller="consistency")
    results["consistency, soft label"] = agreement(*two(mean, members), gold, consistency_rules)
    for name, share in CONSISTENCY.items():
        results[name] = agreement(*two(mean, members), gold, dataclasses.replace(consistency_rules, min_agreement=share))
    anchored_judgments = [
        {"prompt_id": row["prompt_id"], "rewards": s, "num_tokens": n} for row, s, n in zip(rows, default["summed"], lengths)
    ]
    results["anchored rejection"] = agreement(rows, anchored_judgments, gold)

    baseline = results["default"]["outcome"]
    arms = {}
    for name, result in results.items():
        arm = soft_summary(result, baseline) if name.endswith("soft label") else summary(result["outcome"], baseline)
        arms[name] = {**arm, "kept": arm["n"] / len(rows), "gold_margin": margin_of(result)}
    chosen = ["default", *CANDIDATES][choice["chosen"]]
    raw = {
        "machine": machine(),
        "sizes": {k: getattr(args, k) for k in SIZES},
        "lab_prompts": len(rows),
        "scorer": args.scorer,
        "candidates": CANDIDATES,
        "chosen_by_check": chosen,
        "label_signal": signals,
        "arms": arms,
        "seconds": times,
    }
    save_raw("lever_lab", raw)
    write_section("Lever lab", report(raw))
    print(report(raw))
    print(f"written to {docs_dir()}")


def _pts(v: dict) -> str:
    return f"{v['diff'] * 100:+.1f} pts | [{v['ci95'][0] * 100:+.1f}, {v['ci95'][1] * 100:+.1f}]"


def report(r: dict) -> str:
    s = r["sizes"]
    lines = [
        f"`python -m scripts.quality.lever_lab --scorer {r['scorer']}` on {r['machine']}: SmolLM2-135M-Instruct (float32) + "
        f"LoRA r 16, a seed of {s['seed']} demo prompts labelled by the scorer ({DESCRIBED[r['scorer']]}; 2 samples of "
        f"pi_init per prompt), seed DPO 2 epochs at lr {_lr(s['learning_rate'])}. pi_0 answered each of the "
        f"{r['lab_prompts']} lab prompts (the pool outside the seed slice) {s['responses']} times and pi_init once (the "
        f"anchor), T 0.7, {s['max_new_tokens']} new tokens; every labeller scored those same responses, pairs by the "
        "recipe's rules (penalize + auto). Agreement = share of pairs whose chosen response the scorer prefers (a tie "
        "half); paired against the default (pi_0's implicit reward) on the prompts both keep; 95% bootstrap intervals "
        "over prompts. The soft-label row counts a pair C when the scorer agrees and 1 - C when not. Gold margin = the "
        "scorer's chosen minus rejected, mean over the kept pairs.",
        "",
        "| lever | prompts kept | agreement with gold | 95% CI | vs default | 95% CI | mean gold margin | label-signal check |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, a in r["arms"].items():
        sig = r["label_signal"].get(name)
        check = f"{_pct(sig['accuracy'])} [{_pct(sig['ci95_low'])}, {_pct(sig['ci95_high'])}]" if sig else "-"
        lines.append(
            f"| {name} | {_pct(a['kept'])} | {_pct(a['agreement'])} | [{_pct(a['ci95'][0])}, {_pct(a['ci95'][1])}] "
            f"| {_pts(a['vs_baseline'])} | {a['gold_margin']:+.3f} | {check} |"
        )
    lines += [
        "",
        f"The label-signal check (`train.seed_candidates`, the run's own code) chose: **{r['chosen_by_check']}**. The check's "
        "column is its held-out accuracy on the seed pairs (2 folds) for each seed labeller.",
        "",
        "Minutes: " + ", ".join(f"{name} {sec / 60:.1f}" for name, sec in r["seconds"].items()) + ".",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
