"""`selfie run | generate | judge | edit | eval | export | status`."""

from __future__ import annotations

import argparse
import logging
import sys

from selfie.errors import SelfieError


def _run(args: argparse.Namespace, overrides: list[str]) -> None:
    from selfie.config import load_recipe
    from selfie.loop import run_loop

    table = run_loop(load_recipe(args.recipe, overrides), force=args.force)
    if table:
        print(table)


def _status(args: argparse.Namespace) -> None:
    from selfie.status import describe

    print(describe(args.run_dir))


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe")
    parser.add_argument("--force", action="store_true", help="continue a run whose config.yaml differs")


def _add_status_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")


def build_parser() -> argparse.ArgumentParser:
    from selfie import edit, export, generate, implicit_reward
    from selfie.evaluation import cli as evaluation

    parser = argparse.ArgumentParser(prog="selfie", description="Self-generated preference learning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    # verb, help, its arguments, its handler, whether it takes recipe-style --key value overrides
    verbs = [
        ("run", "run or resume a recipe: RECIPE [--key value ...]", _add_run_args, _run, True),
        ("generate", "sample K responses per prompt", generate.add_generate_args, generate.run_generate_command, False),
        ("judge", "implicit-reward judgments and pairs", implicit_reward.add_judge_args, implicit_reward.run_judge_command,
         False),
        ("status", "where a run directory stands", _add_status_args, _status, False),
        ("edit", "build a representation-edited model (AlignEZ / RAHF)", edit.add_edit_args, edit.run_edit_command, True),
        ("eval", "win rates, judge accuracy, per-iteration scores", evaluation.add_eval_args, evaluation.run_eval_command,
         False),
        ("export", "an iteration's policy as a standalone model or a PEFT adapter, with a model card",
         export.add_export_args, export.run_export_command, False),
    ]
    for name, help_text, add_args, handler, takes_overrides in verbs:
        verb = sub.add_parser(name, help=help_text)
        add_args(verb)
        verb.set_defaults(handler=handler, takes_overrides=takes_overrides)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        if getattr(args, "takes_overrides", False):
            args.handler(args, extra)
        else:
            args.handler(args)
    except SelfieError as e:
        print(f"selfie: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full disk, a path under a file: the path and the reason (-v: traceback)
        if args.verbose:
            raise
        print(f"selfie: error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
