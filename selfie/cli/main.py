"""`selfie run | generate | judge | edit | eval | export | answers | status`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from selfie.cli import answers, edit, export, generate, judge
from selfie.cli import eval as evaluation
from selfie.cli.run import add_run_args, run_recipe_command
from selfie.cli.status import add_status_args, run_status_command
from selfie.errors import SelfieError, os_error_line


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other selfie error (the usage is one `-h` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (usage: {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="selfie", description="Self-generated preference learning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    # verb, help, its arguments, its handler, whether it takes recipe-style --key value overrides
    verbs = [
        ("run", "run or resume a recipe: RECIPE [--key value ...]", add_run_args, run_recipe_command, True),
        ("generate", "sample K responses per prompt", generate.add_generate_args, generate.run_generate_command, False),
        ("judge", "implicit-reward judgments and pairs", judge.add_judge_args, judge.run_judge_command, False),
        ("status", "where a run directory stands", add_status_args, run_status_command, False),
        ("edit", "build a representation-edited model (AlignEZ / RAHF)", edit.add_edit_args, edit.run_edit_command, True),
        ("eval", "win rates, judge accuracy, per-iteration scores", evaluation.add_eval_args, evaluation.run_eval_command, False),
        (
            "export",
            "an iteration's policy as a standalone model or a PEFT adapter, with a model card",
            export.add_export_args,
            export.run_export_command,
            False,
        ),
        (
            "answers",
            "a policy's answers to a benchmark's questions, in the benchmark's file format",
            answers.add_answers_args,
            answers.run_answers_command,
            False,
        ),
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
    # A log handler that fails (wandb's debug log on a full disk) must not print its own traceback.
    logging.raiseExceptions = args.verbose
    try:
        if getattr(args, "takes_overrides", False):
            args.handler(args, extra)
        else:
            args.handler(args)
    except BrokenPipeError:  # the reader went away (selfie status | head): nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (SelfieError, OSError) as e:  # bad input; a read-only or full disk, a path under a file (-v: traceback)
        if args.verbose:
            traceback.print_exc()
        print(f"selfie: error: {os_error_line(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
