"""Command-line flags made from the recipe schema's dataclasses, so a command and a recipe share each default and range."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

from selfie.config.schema import Section, section_fields, union_members


def _from_text(text: str, tp: Any) -> Any:
    """A flag's text as a value of the field's type (int, float, str, or a union of them)."""
    for member in union_members(tp):
        try:
            return member(text)
        except ValueError:
            continue
    raise argparse.ArgumentTypeError(f"expected {' or '.join(m.__name__ for m in union_members(tp))}, got {text!r}")


def add_options(parser: argparse.ArgumentParser, section: type, names: Sequence[str], help: dict[str, str] | None = None) -> None:
    """A `--flag-name` for each named field of a config dataclass: typed and range-checked as in a recipe,
    its default the field's, so a command and a recipe share each default."""
    hints, fields = section_fields(section), {f.name: f for f in dataclasses.fields(section)}
    for name in names:
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{(help or {}).get(name, '')} (default: {default})".lstrip()
        flag = "--" + name.replace("_", "-")
        if hints[name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
            continue

        def parse(value: str, name: str = name) -> Any:
            parsed = _from_text(value, hints[name])
            problem = section.out_of_range(name, parsed) if issubclass(section, Section) else None
            if problem:
                raise argparse.ArgumentTypeError(problem)
            return parsed

        parser.add_argument(flag, type=parse, default=default, help=text)


def add_iteration_arg(parser: argparse.ArgumentParser) -> None:
    """A run's `--iteration`, defaulting to the one `selfie export` takes (selfie/export/policy.py::pick_iteration)."""
    parser.add_argument(
        "--iteration",
        type=int,
        default=None,
        help="which iteration (default: the best on validation when the run validates, else the last completed one)",
    )


def from_args(section: type, args: argparse.Namespace) -> Any:
    """The config dataclass of the flags `add_options` made for it (fields without a flag at their defaults)."""
    return section(**{f.name: getattr(args, f.name) for f in dataclasses.fields(section) if hasattr(args, f.name)})
