"""`selfie edit`: build a representation-edited model (AlignEZ / RAHF) from an init mapping and --key value settings."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from selfie.cli.flags import add_options
from selfie.config.loader import load_init, parse_overrides
from selfie.config.schema import INIT_METHODS, RecipeConfig
from selfie.edit.apply import EDIT_FILE
from selfie.edit.build import build_edited_model, provenance_lines
from selfie.errors import SelfieError
from selfie.io import read_json, read_yaml_mapping


def add_edit_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the model to edit: hub id, local directory, .gguf file or built-in alias")
    parser.add_argument("--method", choices=sorted(INIT_METHODS), default=None, help="the edit (default: `method` in --config)")
    parser.add_argument("--output", required=True, help="directory to write the edited standalone model to")
    parser.add_argument("--config", default=None, help="YAML file: an init mapping, or a recipe whose `init:` is used")
    add_options(parser, RecipeConfig, ["seed"])
    parser.epilog = "Further settings as --key value, e.g. --num_prompts 16 --alpha 2 (see docs/EDITING.md)."


def init_settings(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """The init mapping: --config's (or its recipe's `init:`), then the --key value overrides, then --method."""
    init: dict[str, Any] = {}
    if args.config is not None:
        loaded = read_yaml_mapping(args.config, "edit config")
        if not isinstance(loaded.get("init", {}), dict):
            raise SelfieError(f"{args.config}: expected a mapping of init settings (or a recipe with an `init:` mapping)")
        init = dict(loaded.get("init", loaded))
    init.update(parse_overrides(overrides))
    if args.method is not None:
        init["method"] = args.method
    return init


def run_edit_command(args: argparse.Namespace, overrides: list[str]) -> None:
    path = build_edited_model(load_init(init_settings(args, overrides)), args.model, Path(args.output), args.seed)
    print("\n".join(provenance_lines(read_json(path / EDIT_FILE))))
    print(path)
