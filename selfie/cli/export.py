"""`selfie export RUN`: one iteration's policy as a standalone model or a PEFT adapter (selfie/export/policy.py)."""

from __future__ import annotations

import argparse

from selfie.cli.flags import add_iteration_arg
from selfie.errors import SelfieError
from selfie.export.policy import DTYPES, export_run


def add_export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    add_iteration_arg(parser)
    parser.add_argument("--output", required=True, help="directory to write the export to (must be empty or absent)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--merge",
        dest="adapter_only",
        action="store_false",
        help="a standalone model: base, edit and adapter merged (the default)",
    )
    mode.add_argument(
        "--adapter-only",
        dest="adapter_only",
        action="store_true",
        help="the PEFT adapter, plus the base in DIR/base when it is not a hub model",
    )
    parser.set_defaults(adapter_only=False)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights dtype (default: the base model's own)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --output")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="upload the export to this hub repository")
    parser.add_argument("--private", action="store_true", help="create the hub repository as private")


def run_export_command(args: argparse.Namespace) -> None:
    if args.private and not args.push_to_hub:
        raise SelfieError("--private applies only with --push-to-hub")
    print(
        export_run(
            args.run_dir,
            args.output,
            iteration=args.iteration,
            adapter_only=args.adapter_only,
            dtype=args.dtype,
            force=args.force,
            push_to_hub=args.push_to_hub,
            private=args.private,
        )
    )
