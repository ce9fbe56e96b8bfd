"""`selfie run | generate | judge | edit | eval | export | status`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from selfie.errors import SelfieError, os_error_line


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other selfie error (the usage is one `-h` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (usage: {self.prog} -h)\n")


def _run(args: argparse.Namespace, overrides: list[str]) -> None:
    from selfie.config import load_recipe

    config = load_recipe(args.recipe, overrides)
    if args.dry_run:
        from selfie.preflight import dry_run

        print(dry_run(config, args.force))
        return
    from selfie.loop import run_loop

    table = run_loop(config, force=args.force)
    if table:
        print(table)


def _status(args: argparse.Namespace) -> None:
    from selfie.status import describe

    print(describe(args.run_dir))


def build_parser() -> argparse.ArgumentParser:
    from selfie import edit, evaluate, export, generate, judge

    parser = _Parser(prog="selfie", description="Self-generated preference learning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run or resume a recipe: RECIPE [--key value ...]")
    run.add_argument("recipe")
    run.add_argument("--force", action="store_true", help="continue a run whose config.yaml differs")
    run.add_argument("--dry-run", action="store_true", help="check everything and print the plan; write nothing")
    run.set_defaults(handler=_run, takes_overrides=True)

    gen = sub.add_parser("generate", help="sample K responses per prompt")
    generate.add_generate_args(gen)
    gen.set_defaults(handler=generate.run_generate_command)

    jud = sub.add_parser("judge", help="implicit-reward judgments and pairs")
    judge.add_judge_args(jud)
    jud.set_defaults(handler=judge.run_judge_command)

    status = sub.add_parser("status", help="where a run directory stands")
    status.add_argument("run_dir")
    status.set_defaults(handler=_status)

    ed = sub.add_parser("edit", help="build a representation-edited model (AlignEZ / RAHF)")
    edit.add_edit_args(ed)
    ed.set_defaults(handler=edit.run_edit_command, takes_overrides=True)

    ev = sub.add_parser("eval", help="win rates, judge accuracy, per-iteration scores")
    evaluate.add_eval_args(ev)
    ev.set_defaults(handler=evaluate.run_eval_command)

    exp = sub.add_parser("export", help="an iteration's policy as a standalone model or a PEFT adapter, with a model card")
    export.add_export_args(exp)
    exp.set_defaults(handler=export.run_export_command)
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
