"""`selfie eval winrate | accuracy | run`: each writes report.json, report.md and report.png into --output."""

from __future__ import annotations

import argparse
from pathlib import Path


def _common(p: argparse.ArgumentParser, prompts: bool = True) -> None:
    from selfie.config import NON_NEGATIVE, POSITIVE, cli_number
    from selfie.generate import add_sampling_args

    p.add_argument("--judge", required=True, help="reward-model:PATH | callable:module:function | implicit:MODEL@ADAPTER[?beta=B]")
    p.add_argument("--output", required=True, help="directory for report.json, report.md, report.png")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--n-boot", type=cli_number(int, POSITIVE), default=2000, help="bootstrap resamples for the 95%% interval")
    p.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed")
    if prompts:
        p.add_argument("--split", default="train", help="split for hub / saved datasets")
        p.add_argument("--num-prompts", type=cli_number(int, NON_NEGATIVE), default=32, help="first N prompts (0 = all)")
        add_sampling_args(p, max_new_tokens=256)


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    from selfie.config import NON_NEGATIVE, cli_number

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
    acc.add_argument("--split", default="train")
    acc.add_argument("--num-pairs", type=cli_number(int, NON_NEGATIVE), default=0, help="first N pairs (0 = all)")

    run = sub.add_parser("run", help="mean judge score of every iteration of a run directory")
    run.add_argument("run_dir")
    _common(run)
    run.add_argument("--prompts", default=None, help="prompt source (default: the run's held-out prompts)")


def _sampling(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                batch_size=args.batch_size, dtype=args.dtype, n_boot=args.n_boot)


def run_eval_command(args: argparse.Namespace) -> None:
    from selfie.evaluation.report import write_report
    from selfie.io import check_writable
    from selfie.rundir import output_lock

    output = Path(args.output)
    check_writable(output, directory=True)
    with output_lock(output):
        write_report(output, _report(args, output))


def _report(args: argparse.Namespace, output: Path) -> dict:
    from selfie.evaluation.compare import INIT, compare_models, eval_prompts, iteration_label, run_models, run_scores
    from selfie.evaluation.judges import load_judge
    from selfie.evaluation.labels import judge_accuracy

    common = {"kind": args.eval_command, "judge": args.judge}
    # Inputs are read before the judge loads, so a bad file fails fast.
    if args.eval_command == "accuracy":
        from selfie.data import load_preferences

        pairs = load_preferences(args.preferences, args.split)
        pairs = pairs[: args.num_pairs] if args.num_pairs else pairs
        judge = load_judge(args.judge, dtype=args.dtype)
        report = {**common, "preferences": args.preferences, **judge_accuracy(judge, pairs, args.n_boot, args.seed)}
    elif args.eval_command == "winrate":
        prompts = eval_prompts(args.prompts, args.split, args.num_prompts)
        judge = load_judge(args.judge, dtype=args.dtype)
        report = {**common, "prompts": args.prompts, **compare_models(
            judge, args.model_a, args.adapter_a, args.model_b, args.adapter_b, prompts, output_dir=output, **_sampling(args))}
    else:
        config = run_models(args.run_dir)[0]
        source = args.prompts or config.data.prompts
        split = config.data.split if args.prompts is None else args.split
        prompts = eval_prompts(source, split, args.num_prompts, config)
        judge = load_judge(args.judge, dtype=args.dtype)
        scores = run_scores(args.run_dir, judge, prompts, output_dir=output, **_sampling(args))
        rows = [{"iteration": it, "label": iteration_label(it), **s} for it, s in scores.items()]
        report = {**common, "run_dir": str(args.run_dir), "prompts": source, "init_key": INIT, "rows": rows}
    return report
