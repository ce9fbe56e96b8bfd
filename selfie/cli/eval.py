"""`selfie eval winrate | accuracy | run`: each writes report.json, report.md and report.png into --output."""

from __future__ import annotations

import argparse
from pathlib import Path

from selfie.cli.flags import add_options, from_args
from selfie.config.schema import EvalOptions
from selfie.data import load_preferences
from selfie.evaluation.compare import compare_models, eval_prompts
from selfie.evaluation.judges import check_judge, load_judge
from selfie.evaluation.labels import judge_accuracy
from selfie.evaluation.report import write_report
from selfie.io import check_writable
from selfie.run.evaluation import INIT, iteration_label, run_scores
from selfie.run.lock import output_lock
from selfie.run.rundir import RunContext
from selfie.run.validation import recorded_best

HELP = {
    "dtype": "auto, float32, bfloat16 or float16",
    "n_boot": "bootstrap resamples for the 95%% interval",
    "seed": "sampling and bootstrap seed",
    "split": "split for hub / saved datasets",
    "num_prompts": "first N prompts (0 = all)",
    "num_pairs": "first N pairs (0 = all)",
    "temperature": "0 = greedy",
    "batch_size": "sequences decoded together",
    "backend": "generation backend: auto, static, continuous or vllm",
}


def _common(p: argparse.ArgumentParser, prompts: bool = True) -> None:
    p.add_argument(
        "--judge",
        required=True,
        help="reward-model:PATH | callable:module:function | implicit:MODEL@ADAPTER[?beta=B] | remote-rm:URL | "
        "classify:URL?model=NAME | llm-score:URL?model=NAME | llm-pair:URL?model=NAME (docs/JUDGES.md)",
    )
    p.add_argument("--output", required=True, help="directory for report.json, report.md, report.png")
    add_options(p, EvalOptions, ["dtype", "n_boot", "seed"], HELP)
    if prompts:
        add_options(
            p, EvalOptions, ["split", "num_prompts", "max_new_tokens", "temperature", "top_p", "batch_size", "backend"], HELP
        )


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", required=True)
    win = sub.add_parser("winrate", help="win rate of model A over model B on held-out prompts")
    _common(win)
    win.add_argument("--model-a", required=True)
    win.add_argument("--adapter-a", default=None)
    win.add_argument("--model-b", required=True)
    win.add_argument("--adapter-b", default=None)
    win.add_argument("--prompts", default="demo", help="prompt source: file, saved dataset dir, hub id or 'demo'")

    acc = sub.add_parser("accuracy", help="how often the judge prefers the labelled chosen response")
    _common(acc, prompts=False)
    acc.add_argument("--preferences", required=True, help="preference source: file, saved dataset dir, hub id or 'demo'")
    add_options(acc, EvalOptions, ["split", "num_pairs"], HELP)

    run = sub.add_parser("run", help="mean judge score of every iteration of a run directory")
    run.add_argument("run_dir")
    _common(run)
    run.add_argument("--prompts", default=None, help="prompt source (default: the run's held-out prompts)")


def run_eval_command(args: argparse.Namespace) -> None:
    output = Path(args.output)
    check_writable(output, directory=True)
    check_judge(args.judge)  # a served judge's server is asked once, before any answer is generated
    with output_lock(output):
        write_report(output, REPORTS[args.eval_command](args, from_args(EvalOptions, args), output))


# Each reads its inputs before the judge loads, so that a bad file fails fast.


def _accuracy_report(args: argparse.Namespace, options: EvalOptions, output: Path) -> dict:
    pairs = load_preferences(args.preferences, options.split)
    pairs = pairs[: options.num_pairs] if options.num_pairs else pairs
    judge = load_judge(args.judge, options.dtype, output / ANSWERS)
    return {
        "kind": "accuracy",
        "judge": args.judge,
        "preferences": args.preferences,
        **judge_accuracy(judge, pairs, options.n_boot, options.seed),
    }


def _winrate_report(args: argparse.Namespace, options: EvalOptions, output: Path) -> dict:
    prompts = eval_prompts(args.prompts, options.split, options.num_prompts)
    judge = load_judge(args.judge, options.dtype, output / ANSWERS)
    return {
        "kind": "winrate",
        "judge": args.judge,
        "prompts": args.prompts,
        **compare_models(judge, args.model_a, args.adapter_a, args.model_b, args.adapter_b, prompts, options, output_dir=output),
    }


def _run_report(args: argparse.Namespace, options: EvalOptions, output: Path) -> dict:
    ctx = RunContext.load(args.run_dir)
    config = ctx.config
    source = args.prompts or config.data.prompts
    split = config.data.split if args.prompts is None else options.split
    prompts = eval_prompts(source, split, options.num_prompts, config)
    judge = load_judge(args.judge, options.dtype, output / ANSWERS)
    scores = run_scores(ctx, judge, prompts, options, output_dir=output)
    best = recorded_best(ctx)  # marked in the report: the iteration `selfie export` takes
    rows = [
        {"iteration": it, "label": iteration_label(ctx, it) + (" (best on validation)" if it == best else ""), **s}
        for it, s in scores.items()
    ]
    return {
        "kind": "run",
        "judge": args.judge,
        "run_dir": str(args.run_dir),
        "prompts": source,
        "init_key": INIT,
        "best_iteration": best,
        "rows": rows,
    }


ANSWERS = "judge_answers.jsonl"  # a served judge's answers: a rerun into the same --output asks only for the rest
REPORTS = {"accuracy": _accuracy_report, "winrate": _winrate_report, "run": _run_report}
