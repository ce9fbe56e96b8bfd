"""Loading a recipe: YAML files plus `--key value` overrides, coerced to the schema's types; unknown keys are errors.

A recipe is nested (`train.learning_rate`); an override names the dotted path (`--train.learning_rate 1e-5`, or
`--num_iterations 2` at the top). Values are parsed as YAML scalars, so `--generate.temperature 0.5` is a float and
`--report_to '[wandb]'` a list.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from selfie.config.schema import (
    EditConfig,
    RecipeConfig,
    RecipeKeyError,
    is_enum,
    is_section_type,
    section_fields,
    shape_of,
    to_dict,
    union_members,
)
from selfie.config.trainer_fields import SELFIE_SETS, TRAINER_RANGES, trainer_fields
from selfie.errors import SelfieError
from selfie.io import read_yaml_mapping


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) a YAML value against a field's type hint."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = union_members(tp)
        if any(is_enum(m) for m in members):  # TrainingArguments' `OptimizerNames | str`: the str is the enum's name
            members = [m for m in members if m is not str]
        if value is None and len(members) < len(typing.get_args(tp)):
            return None
        shaped = [m for m in members if shape_of(m) is type(value)]
        if len(members) == 1 or len(shaped) == 1:  # the one member it can be: that member's error names what is wrong
            return _coerce(value, members[0] if len(members) == 1 else shaped[0], key)
        for arg in members:
            try:
                return _coerce(value, arg, key)
            except SelfieError:
                continue
        raise SelfieError(f"recipe key '{key}': expected {tp}, got {value!r}")
    if is_section_type(tp):
        if not isinstance(value, dict):
            raise SelfieError(f"recipe key '{key}': expected a mapping, got {value!r}")
        if hasattr(tp, "variant"):  # a section whose keys depend on one of its values (init: its method)
            tp = tp.variant(value, key)
        return _build(tp, value, prefix=f"{key}.")
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise SelfieError(f"recipe key '{key}': expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SelfieError(f"recipe key '{key}': expected a mapping, got {value!r}")
        return value
    if tp is Any:
        return value
    if is_enum(tp):
        if value not in {m.value for m in tp}:
            raise SelfieError(f"recipe key '{key}': expected one of {', '.join(str(m.value) for m in tp)}, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-5` as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise SelfieError(f"recipe key '{key}': expected {tp.__name__}, got {value!r}")
    return value


# Keys of earlier versions, with what replaced them.
RENAMED_KEYS = {
    "judge.allow_truncated_chosen": "judge.truncated (true was 'keep', false 'drop')",
    "judge.beta": "train.beta (the implicit reward is scored with the DPO loss's own beta)",
}


def _trainer_arguments(section: type, values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """`values`, keys `section` does not declare, as trainer arguments; raises naming the first that is not one."""
    fields = trainer_fields()
    for key in sorted(values):
        if key in SELFIE_SETS:
            raise SelfieError(f"recipe key '{prefix}{key}': selfie sets it itself ({SELFIE_SETS[key]})")
        if key not in fields:
            raise SelfieError(
                f"unknown recipe key '{prefix}{key}' (known: {', '.join(sorted(section_fields(section)))}, "
                "and the fields of TRL's DPOConfig and transformers' TrainingArguments)"
            )
    coerced = {key: _coerce(value, fields[key], f"{prefix}{key}") for key, value in sorted(values.items())}
    for key, value in coerced.items():
        if key in TRAINER_RANGES and value is not None and not TRAINER_RANGES[key].test(value):
            raise SelfieError(f"recipe key '{prefix}{key}': expected {TRAINER_RANGES[key].expected}, got {value!r}")
    return coerced


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = section_fields(cls)
    unknown = sorted(set(values) - set(hints))
    for key in unknown:
        if f"{prefix}{key}" in RENAMED_KEYS:
            raise SelfieError(f"recipe key '{prefix}{key}' was replaced by {RENAMED_KEYS[prefix + key]}")
    extra = {}
    if unknown and getattr(cls, "EXTRA", None):  # a section that takes another dataclass's fields too (train:)
        extra = {cls.EXTRA: _trainer_arguments(cls, {key: values[key] for key in unknown}, prefix)}
    elif unknown:
        raise SelfieError(f"unknown recipe key '{prefix}{unknown[0]}' (known: {', '.join(sorted(hints))})")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in values.items() if name in hints}
    try:
        return cls(**kwargs, **extra)
    except RecipeKeyError as e:  # here the section's place is known: a data source's keys are data.prompts[0]....
        raise SelfieError(e.at(prefix)) from None


def build_recipe(values: dict[str, Any]) -> RecipeConfig:
    """The RecipeConfig of a recipe's values (a parsed YAML mapping), every key checked."""
    return _build(RecipeConfig, values)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SelfieError(f"override --{dotted}: '{part}' is not a section")
    node[leaf] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`['--train.learning_rate', '1e-5', '--num_iterations=2']` -> a nested dict."""
    tree: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise SelfieError(f"unexpected argument '{arg}': overrides are --key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise SelfieError(f"override --{key} has no value")
            value = args[i + 1]
            i += 1
        if not value.strip():  # YAML would read it as null: say so rather than unset the key unasked
            raise SelfieError(f"override --{key}: empty value (write null to unset a key, '\"\"' for an empty string)")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise SelfieError(f"override --{key}: not a YAML value ({str(e).splitlines()[0]})") from None
        _set_dotted(tree, key.replace("-", "_"), parsed)
        i += 1
    return tree


def _merge(base: dict, extra: dict) -> dict:
    """Sections merge key by key; an `init` naming another method replaces the section (its keys are the method's)."""
    out = dict(base)
    for key, value in extra.items():
        section = out.get(key)
        other_method = (
            key == "init"
            and isinstance(section, dict)
            and isinstance(value, dict)
            and value.get("method", section.get("method")) != section.get("method")
        )
        if isinstance(value, dict) and isinstance(section, dict) and not other_method:
            out[key] = _merge(section, value)
        else:
            out[key] = value
    return out


def load_recipe(path: str | Path | None, overrides: list[str] | dict | None = None) -> RecipeConfig:
    """Build a RecipeConfig from a YAML file (or defaults when path is None) and overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        values = read_yaml_mapping(path, "recipe")
        if not values:  # every default: 2,000 seed prompts and 58,000 iteration prompts of the built-in pool
            raise SelfieError(f"{path}: the recipe is empty; start from one in recipes/ (every key: docs/RECIPES.md)")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    values = _merge(values, overrides or {})
    try:
        return build_recipe(values)
    except SelfieError as e:
        raise SelfieError(f"{_source(str(e), path, overrides or {})}{e}") from None


def _source(error: str, path: str | Path | None, overrides: dict) -> str:
    """Where the key an error names was set: `override --KEY: ` when the command line set it (or a section holding
    it), else the recipe file (nothing for the defaults)."""
    named = re.search(r"recipe keys? '([^']+)'", error)
    if named:
        node, parts = overrides, re.split(r"\.|\[", named.group(1))
        for depth, part in enumerate(parts, 1):
            if not isinstance(node, dict) or part not in node:
                break
            if depth == len(parts) or not isinstance(node[part], dict):
                return f"override --{'.'.join(parts[:depth])}: "
            node = node[part]
    return f"{path}: " if path is not None else ""


def load_init(values: dict[str, Any]) -> EditConfig:
    """The `init:` settings of a mapping such as {method: alignez, num_prompts: 32}, checked as in a recipe."""
    return _coerce(values, EditConfig, "init")


def dump_recipe(config: RecipeConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
