"""Which labellers carry the seed's preference? Their agreement with the gold scorer on prompts none was fitted on.

One seed adapter (pi_0: DPO on the gold-labelled seed, the quality benchmark's seed stage, with the label-signal
check) samples K responses per lab prompt (the first iteration slice of the loop's split) once; the gold scorer
(scripts/quality/scorer.py) and every labeller score those same responses; the loop's pair rules (penalize + auto,
the recipe defaults) make each labeller's pair per prompt. A pair agrees when the gold scorer prefers its chosen
response (a tie counts half). No policy is trained beyond the labellers' own fitting on the seed pairs, so the lab
costs minutes and says which levers are worth an end-to-end run:

- implicit reward of pi_0 against pi_init, summed over the response tokens (the loop's default) or per token
  (judge.length_normalize);
- K = 2 / 4 / 8 responses per prompt, best-vs-worst (generate.num_responses; the first K of the 8 sampled);
- the confidence filter (judge.min_margin_quantile) against SPA's smoothing: agreement by margin quartile says
  whether the margin predicts a correct label at all;
- an ensemble of seed adapters on bootstrap resamples of the seed (judge.labeller: ensemble), with and without
  dropping the pairs its members disagree on (judge.min_agreement);
- a Bradley-Terry head on pi_init's frozen hidden states fitted on the seed pairs (judge.labeller: bradley-terry).

    python -m scripts.quality.label_lab [--quick]

Results: docs/BENCHMARKS.md "Label lab" and docs/bench/label_lab.json. Run alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from selfie.config.schema import EvalOptions, JudgeConfig
from selfie.data import load_prompts, split_prompts
from selfie.dist import Ranks, process_state
from selfie.evaluation.compare import score_unique
from selfie.evaluation.judges import load_judge
from selfie.generation.generate import generate_responses, load_generator
from selfie.io import atomic_write_json, read_json, read_jsonl
from selfie.labelling.bradley_terry import fit_on_pairs, response_features
from selfie.labelling.implicit_reward import implicit_rewards, tokenised
from selfie.labelling.pairs import select_pairs
from selfie.models import load_policy
from selfie.run.context import StageContext
from selfie.run.labellers import label_signal, labeller_for
from selfie.stats import bootstrap_ci
from selfie.tokens import pad_token_id

from scripts.benchlib import docs_dir, machine, parse_args, save_raw, write_section
from scripts.quality.benchmark import recipe, run
from scripts.quality.scorer import add_scorer_arg, gold_of

SIZES = {"seed": 40, "iterations": [64], "responses": 8, "max_new_tokens": 96, "members": 3}
QUICK = {"seed": 6, "iterations": [6], "responses": 4, "max_new_tokens": 16, "members": 2}
RULES = JudgeConfig()  # the recipe defaults: penalize + auto
QUANTILES = (0.25, 0.5)  # judge.min_margin_quantile arms
AGREEMENT = (0.6, 1.0)  # judge.min_agreement arms: pairs most members (2 of 3) agree on, pairs all of them agree on
L2S = (0.1, 1.0, 10.0)  # judge.bradley_terry_l2 arms


def measured(times: dict, name: str, path: Path, make: Callable[[], object]):
    """`make()`'s JSON result, computed once per work directory with the seconds it took (a rerun of the lab reuses
    both, so its minutes are those of the run that did the work); the seconds go to `times[name]`."""
    if not path.exists():
        start = time.perf_counter()
        value = make()
        atomic_write_json(path, {"value": value, "seconds": time.perf_counter() - start})
    stored = read_json(path)
    times[name] = stored["seconds"]
    return stored["value"]


def sample(work: Path, seed_run, prompts: list[dict], args: argparse.Namespace) -> list[dict]:
    """K responses per lab prompt from pi_0, sampled as iteration 1 of the loop would (seed + 1)."""
    out = work / "responses.jsonl"
    if not out.exists():
        model, tokenizer = load_generator(seed_run.pi_init, seed_run.adapter(0), "float32", "auto", "cpu")
        generate_responses(
            model, tokenizer, prompts, out, num_responses=args.responses, max_new_tokens=args.max_new_tokens,
            temperature=0.7, seed=43, batch_size=64,
        )  # fmt: skip
    return read_jsonl(out)


def implicit_scores(seed_run, adapter: Path, rows: list[dict], beta: float) -> dict:
    """{summed, per_token} implicit rewards of every response, and its token count, from one scoring pass."""
    policy, tokenizer = load_policy(seed_run.pi_init, adapter, "float32")
    judged, _ = implicit_rewards(policy, tokenised(policy, tokenizer, rows), pad_token_id(tokenizer), beta=beta, token_budget=512)
    per_token = [
        [beta * (p - r) / max(n, 1) for p, r, n in zip(j["policy_logps"], j["reference_logps"], j["num_tokens"])] for j in judged
    ]
    return {"summed": [j["rewards"] for j in judged], "per_token": per_token, "num_tokens": [j["num_tokens"] for j in judged]}


def labeller_context(seed_run, work: Path, labeller: str, **judge) -> StageContext:
    """A run directory holding only the seed run's pairs, under a recipe whose labeller is `labeller`: where the
    run's own code fits that labeller and runs its label-signal check."""
    ctx = StageContext(
        dataclasses.replace(seed_run.config, judge=dataclasses.replace(seed_run.config.judge, labeller=labeller, **judge)),
        work / "labellers" / labeller,
        Ranks(process_state()),
    )
    if not ctx.pairs(0).exists():
        ctx.pairs(0).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(seed_run.pairs(0), ctx.pairs(0))
    return ctx


def head_scores(ctx: StageContext, rows: list[dict], l2s: tuple[float, ...]) -> dict[str, list[list[float]]]:
    """The bradley-terry rewards of every response, one set per L2 penalty (heads fitted on the seed pairs)."""
    model, tokenizer = load_policy(ctx.pi_init, None, "float32")
    features = response_features(model, tokenizer, [r["prompt"] for r in rows for _ in r["responses"]], flat_texts(rows))
    seed_pairs = read_jsonl(ctx.pairs(0))
    return {f"{l2:g}": regroup(rows, fit_on_pairs(model, tokenizer, seed_pairs, l2).rewards(features)) for l2 in l2s}


def ensemble_scores(ctx: StageContext, rows: list[dict], beta: float) -> list[list[list[float]]]:
    """Each member's summed implicit rewards, per prompt: [prompt][member][response]; the members are trained by the
    run's own ensemble labeller (bootstrap resamples of the seed pairs)."""
    labeller_for("ensemble").fit(ctx)
    members = [
        implicit_scores(ctx, ctx.ensemble / f"member_{m}" / "adapter", rows, beta)["summed"]
        for m in range(ctx.config.judge.ensemble_size)
    ]
    return [list(per_member) for per_member in zip(*members)]


def flat_texts(rows: list[dict]) -> list[str]:
    return [text for row in rows for text in row["responses"]]


def regroup(rows: list[dict], flat: list[float]) -> list[list[float]]:
    """Flat per-response values back into one list per prompt."""
    out, offset = [], 0
    for row in rows:
        out.append(flat[offset : offset + len(row["responses"])])
        offset += len(row["responses"])
    return out


def first(
    rows: list[dict], scores: list[list[float]], lengths: list[list[int]], k: int, members: list | None = None
) -> tuple[list[dict], list[dict]]:
    """The rows and judgments cut to each prompt's first k responses (with the members' rewards, for an ensemble)."""
    cut = [{**row, "responses": row["responses"][:k], "finished": row["finished"][:k]} for row in rows]
    judgments = [
        {"prompt_id": row["prompt_id"], "rewards": s[:k], "num_tokens": n[:k]} for row, s, n in zip(rows, scores, lengths)
    ]
    for judged, per_member in zip(judgments, members or ()):
        judged["member_rewards"] = [m[:k] for m in per_member]
    return cut, judgments


def agreement(rows: list[dict], judgments: list[dict], gold: dict[str, dict[str, float]], rules: JudgeConfig = RULES) -> dict:
    """Per prompt (in `rows`' order): 1 when gold prefers the pair's chosen response, 0 when the rejected, 0.5 on a tie,
    None when the prompt gave no pair; each pair's margin, its gold margin (gold chosen - gold rejected) and its
    labellers' agreement (1 without members)."""
    pairs, _ = select_pairs(rows, judgments, rules.rules)
    by_id = {p["prompt_id"]: p for p in pairs}
    result = {"outcome": [], "margin": [], "gold_margin": [], "labeller_agreement": []}
    for row in rows:
        p = by_id.get(row["prompt_id"])
        if p is None:
            for values in result.values():
                values.append(None)
            continue
        c, r = (gold[row["prompt_id"]][p[side][-1]["content"]] for side in ("chosen", "rejected"))
        result["outcome"].append(1.0 if c > r else 0.0 if c < r else 0.5)
        result["margin"].append(p["margin"])
        result["gold_margin"].append(c - r)
        result["labeller_agreement"].append(p.get("agreement", 1.0))
    return result


def summary(outcome: list[float | None], baseline: list[float | None] | None = None) -> dict:
    values = np.array([o for o in outcome if o is not None], dtype=float)
    result = {"agreement": float(values.mean()), "ci95": bootstrap_ci(values, EvalOptions.n_boot), "n": len(values)}
    if baseline is not None:
        diff = np.array([a - b for a, b in zip(outcome, baseline) if a is not None and b is not None], dtype=float)
        result["vs_baseline"] = {"diff": float(diff.mean()), "ci95": bootstrap_ci(diff, EvalOptions.n_boot), "n": len(diff)}
    return result


def by_quartile(outcome: list[float | None], margins: list[float | None]) -> list[dict]:
    """Agreement within each quarter of the pairs by margin, lowest first: does a larger margin mean a truer label?"""
    pairs = sorted((m, o) for m, o in zip(margins, outcome) if m is not None)
    quarters = np.array_split(np.arange(len(pairs)), 4)
    return [summary([pairs[i][1] for i in q]) | {"margin_max": pairs[q[-1]][0]} for q in quarters if len(q)]


def gold_scores(rows: list[dict], gold: str) -> list[float]:
    """The gold scorer's score of every response (each distinct response scored once)."""
    return score_unique(load_judge(gold), [r["prompt"] for r in rows for _ in r["responses"]], flat_texts(rows))


def by_response(rows: list[dict], flat: list[float]) -> dict[str, dict[str, float]]:
    """{prompt_id: {response: score}}."""
    return {row["prompt_id"]: dict(zip(row["responses"], scores)) for row, scores in zip(rows, regroup(rows, flat))}


def measure_arms(rows: list[dict], gold: dict, scores: dict, k_values: list[int]) -> tuple[dict, dict]:
    """Every labeller / rule's agreement with gold (paired against the default: implicit, summed, K=2), and the
    agreement by margin quarter of each labeller at K=2."""
    lengths, members = scores["num_tokens"], scores["ensemble"]
    outcomes = {}
    for name, values in scores["labellers"].items():
        for k in k_values:
            per_member = members if name.startswith("ensemble") else None
            outcomes[f"{name}, K={k}"] = agreement(*first(rows, values, lengths, k, per_member), gold)
    for q in QUANTILES:
        outcomes[f"implicit, summed, K=2, min_margin_quantile {q:g}"] = agreement(
            *first(rows, scores["labellers"]["implicit, summed"], lengths, 2),
            gold,
            dataclasses.replace(RULES, min_margin_quantile=q),
        )
    ensemble_rules = dataclasses.replace(RULES, labeller="ensemble")
    for share in AGREEMENT:
        for k in (2, max(k_values)):
            outcomes[f"ensemble, K={k}, min_agreement {share:g}"] = agreement(
                *first(rows, scores["labellers"]["ensemble (mean)"], lengths, k, members),
                gold,
                dataclasses.replace(ensemble_rules, min_agreement=share),
            )
    baseline = outcomes["implicit, summed, K=2"]["outcome"]
    # a filter of the default labeller keeps a subset of its pairs, with the same picks: nothing to pair against
    arms = {
        name: summary(result["outcome"], None if "min_margin_quantile" in name else baseline) for name, result in outcomes.items()
    }
    quartiles = {name: by_quartile(o["outcome"], o["margin"]) for name, o in outcomes.items() if name.endswith("K=2")}
    return arms, quartiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/selfie-label-lab", help="the seed run, responses and scores")
    add_scorer_arg(parser)
    parser.set_defaults(**SIZES)
    args = parse_args(parser, QUICK)
    work = Path(args.work) / args.scorer / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    times, signals = {}, {}

    judge_rules = {"truncated": RULES.truncated, "length_penalty": RULES.length_penalty, "signal_folds": 2}
    seed_run, _ = run(recipe(args, work, "seed", judge=judge_rules))
    times["seed stage (with the label-signal check)"] = sum(seed_run.read_metrics(0)["times"].values())
    signals["implicit"] = seed_run.read_metrics(0)["seed"]["label_signal"]
    prompts = split_prompts(load_prompts("demo"), args.seed, args.iterations, 42).iterations[0]
    rows = measured(times, "sampling", work / "sampling.json", lambda: sample(work, seed_run, prompts, args))
    gold = by_response(rows, measured(times, "gold scoring", work / "gold.json", lambda: gold_scores(rows, gold_of(args))))

    beta = seed_run.config.train.beta
    implicit = measured(
        times, "implicit scoring", work / "implicit.json", lambda: implicit_scores(seed_run, seed_run.adapter(0), rows, beta)
    )
    head_ctx = labeller_context(seed_run, work, "bradley-terry")
    heads = measured(times, "bradley-terry fitting and scoring", work / "heads.json", lambda: head_scores(head_ctx, rows, L2S))
    signals["bradley-terry"] = measured(
        times, "bradley-terry label-signal check", work / "signal-bradley-terry.json", lambda: label_signal(head_ctx)
    )
    ensemble_ctx = labeller_context(seed_run, work, "ensemble", ensemble_size=args.members)
    members = measured(
        times, "ensemble training and scoring", work / "ensemble.json", lambda: ensemble_scores(ensemble_ctx, rows, beta)
    )
    signals["ensemble"] = measured(
        times, "ensemble label-signal check", work / "signal-ensemble.json", lambda: label_signal(ensemble_ctx)
    )

    labellers = {"implicit, summed": implicit["summed"], "implicit, per token": implicit["per_token"]}
    labellers |= {f"bradley-terry, l2 {l2}": values for l2, values in heads.items()}
    labellers["ensemble (mean)"] = [[sum(v) / len(v) for v in zip(*per_member)] for per_member in members]
    scores = {"labellers": labellers, "num_tokens": implicit["num_tokens"], "ensemble": members}
    arms, quartiles = measure_arms(rows, gold, scores, sorted({2, 4, args.responses}))
    results = {
        "machine": machine(),
        "sizes": {k: getattr(args, k) for k in SIZES},
        "lab_prompts": len(rows),
        "scorer": args.scorer,
        "rules": dataclasses.asdict(RULES),
        "label_signal": signals,
        "arms": arms,
        "margin_quartiles": quartiles,
        "seconds": times,
    }
    save_raw("label_lab", results)
    write_section("Label lab", report(results))
    print(report(results))
    print(f"written to {docs_dir()}")


def _pct(value: float) -> str:
    return f"{value:.1%}"


def report(r: dict) -> str:
    s = r["sizes"]
    lines = [
        f"`python -m scripts.quality.label_lab` on {r['machine']}: SmolLM2-135M-Instruct (float32) + LoRA r 16. The seed stage of the "
        f"quality benchmark ({s['seed']} demo prompts, 2 samples each of pi_init labelled by the gold scorer, seed DPO 2 epochs at "
        f"lr 2e-4), then {s['responses']} responses of pi_0 per lab prompt ({r['lab_prompts']} prompts of the first iteration "
        f"slice, T 0.7, {s['max_new_tokens']} new tokens), sampled once and scored by every labeller: pi_0's implicit reward "
        "(summed, per token), Bradley-Terry heads on pi_init's hidden states fitted on the seed pairs (`judge.bradley_terry_l2` "
        f"0.1 / 1 / 10), and an ensemble of {s['members']} seed adapters on bootstrap resamples of the seed (mean reward; "
        "`judge.min_agreement`). Pairs by the recipe's rules "
        f"(`judge.truncated: {r['rules']['truncated']}`, `judge.length_penalty: {r['rules']['length_penalty']}`). Agreement = share "
        "of pairs whose chosen response the gold scorer (all-MiniLM-L6-v2 relevance, `scripts/quality/scorer.py`) scores higher, "
        "a tie counting half; 95% bootstrap intervals over prompts; the difference to the default labeller (implicit, summed, "
        "K=2) is paired by prompt.",
        "",
        "| labeller / rule | pairs | agreement with gold | 95% CI | vs implicit summed K=2 | 95% CI |",
        "|---|---|---|---|---|---|",
    ]
    for name, a in r["arms"].items():
        v = a.get("vs_baseline")
        versus = f"{v['diff'] * 100:+.1f} pts | [{v['ci95'][0] * 100:+.1f}, {v['ci95'][1] * 100:+.1f}]" if v else "its subset | -"
        lines.append(f"| {name} | {a['n']} | {_pct(a['agreement'])} | [{_pct(a['ci95'][0])}, {_pct(a['ci95'][1])}] | {versus} |")
    lines += [
        "",
        "Agreement by quarter of the raw margin (score chosen - score rejected, lowest first), K=2: does a larger margin mean "
        "a truer label? (`judge.min_margin_quantile` filters by the shaped margin, after the length and truncation terms.)",
        "",
    ]
    lines += ["| labeller | " + " | ".join(f"quarter {i}" for i in range(1, 5)) + " |", "|---|---|---|---|---|"]
    for name, quarters in r["margin_quartiles"].items():
        cells = [f"{_pct(q['agreement'])} [{_pct(q['ci95'][0])}, {_pct(q['ci95'][1])}]" for q in quarters]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "What the label-signal check (2-fold over the seed pairs, the run's own code) said of each labeller beforehand:",
        "",
    ]
    lines += ["| labeller | held-out seed pairs ranked as labelled | 95% CI | n | seconds |", "|---|---|---|---|---|"]
    for name, sig in r["label_signal"].items():
        lines.append(
            f"| {name} | {_pct(sig['accuracy'])} | [{_pct(sig['ci95_low'])}, {_pct(sig['ci95_high'])}] | {sig['n']} | "
            f"{sig['seconds']:.0f} |"
        )
    lines += ["", "Minutes: " + ", ".join(f"{name} {sec / 60:.1f}" for name, sec in r["seconds"].items()) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
