"""The docs against the code: README is a short guide, every recipe key the docs name exists and every key is
documented with its default, the keys that may differ on resume are the code's, and every internal link resolves."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from selfie.config.compat import HARMLESS_KEYS
from selfie.config.schema import (
    AlignEZConfig,
    DataConfig,
    EditConfig,
    EvalConfig,
    GenerateConfig,
    JudgeConfig,
    LoraConfig,
    ModelConfig,
    RAHFConfig,
    RecipeConfig,
    RefineConfig,
    SourceConfig,
    TrainConfig,
    section_fields,
)
from selfie.config.trainer_fields import trainer_fields

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
GUIDES = ["README.md", "RECIPES.md", "LAUNCHING.md", "COMMANDS.md", "BENCHMARKS.md", "GLOSSARY.md"]
SECTIONS = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "generate": GenerateConfig,
    "judge": JudgeConfig,
    "train": TrainConfig,
    "refine": RefineConfig,
    "eval": EvalConfig,
}
# `section.word` in backticks that is not a recipe key, and why
NOT_KEYS = {
    "data.py": "a file",
    "eval.json": "a file",
    "init.n_layer": "the misspelt key an error message names",
    "judge.beta": "the key an earlier version had (renamed train.beta)",
    "model.generate": "transformers' generate method",
    "model.generate_batch": "transformers' continuous-batching method",
}
KEY = re.compile(r"`((?:model|lora|data|generate|judge|train|refine|eval|init)\.[A-Za-z_0-9]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def recipe_keys() -> set[str]:
    keys = {f"{name}.{field}" for name, cls in SECTIONS.items() for field in section_fields(cls)}
    keys |= {f"init.{field}" for cls in (AlignEZConfig, RAHFConfig) for field in section_fields(cls)}
    return keys | {f"train.{field}" for field in trainer_fields()}


def test_readme_is_a_short_guide_with_contents_and_no_results_section():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    headers = [line for line in text.splitlines() if line.startswith("## ")]
    assert headers[0] == "## Contents" and not any("Results" in h for h in headers)
    for page in GUIDES[1:]:
        assert "## Contents" in (DOCS / page).read_text(), page


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_recipe_key_the_docs_name_exists(page):
    named = set(KEY.findall(page.read_text())) - set(NOT_KEYS)
    assert named <= recipe_keys(), sorted(named - recipe_keys())


def documented_defaults(text: str, prefix: str = "") -> dict[str, str]:
    """{key: default cell} of the `| key | default | meaning |` rows."""
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+) \|", text, flags=re.MULTILINE)
    return {prefix + key: cell.strip() for key, cell in rows}


def written(default) -> str:
    """A default as the reference writes it: YAML's flow style in backticks."""
    return "`" + yaml.safe_dump(default, default_flow_style=True, width=1000).strip().removesuffix("\n...") + "`"


def defaults_of(cls: type) -> dict[str, object]:
    values = {}
    for f in dataclasses.fields(cls):
        if f.name != getattr(cls, "EXTRA", None):
            values[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return values


def test_every_recipe_key_is_in_the_reference_with_the_schemas_default():
    text = (DOCS / "RECIPES.md").read_text()
    reference = documented_defaults(text[text.index("## Every key") : text.index("## Sampling")])
    expected = {}
    for name, cls in SECTIONS.items():
        expected |= {f"{name}.{field}": value for field, value in defaults_of(cls).items()}
    expected |= {field: value for field, value in defaults_of(RecipeConfig).items() if field not in SECTIONS}
    expected |= {field: value for field, value in defaults_of(SourceConfig).items() if field != "path"}
    for key, value in expected.items():
        assert key in reference, f"{key} is not in docs/RECIPES.md"
        if key not in ("init", "eval"):  # sections, written as what they hold
            assert reference[key] == written(value), (key, reference[key], written(value))


def test_every_init_key_is_in_the_editing_guide_with_its_default():
    reference = documented_defaults((DOCS / "EDITING.md").read_text())
    for cls in (EditConfig, AlignEZConfig, RAHFConfig):
        for field in defaults_of(cls):
            assert field == "method" or field in reference, f"init.{field} is not in docs/EDITING.md"


def test_the_keys_that_may_differ_on_resume_are_the_codes():
    text = " ".join((DOCS / "RECIPES.md").read_text().split())
    (listed,) = re.findall(r"Keys that may differ on resume: ((?:`[^`]+`(?:, )?)+)\.", text)
    assert set(re.findall(r"`([^`]+)`", listed)) == set(HARMLESS_KEYS)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headers."""
    headers = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headers}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_internal_link_resolves(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target}"
        if anchor:
            assert anchor in anchors(linked), f"{page.name}: {target}"


def test_the_compat_runs_ends_are_the_ranges_ends():
    """`make test-compat`'s oldest set is each range's lower bound, its newest set lies inside each range."""
    from scripts.dev.compat import SETS

    text = (ROOT / "pyproject.toml").read_text()
    ranges = {name: (low, high) for name, low, high in re.findall(r'"([a-z]+)>=([\d.]+),<([\d.]+)"', text)}
    version = lambda text: tuple(int(part) for part in text.split("."))  # noqa: E731
    for package, oldest in SETS["oldest"].items():
        low, high = ranges[package]
        assert version(oldest)[: len(version(low))] == version(low), package
        assert version(low) <= version(SETS["newest"][package]) < version(high), package


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_code_reference_names_a_definition_that_exists(page):
    """`selfie/x.py::name` in the docs: the file exists and defines `name` (a function, class or assignment)."""
    for path, name in re.findall(r"`((?:selfie|scripts|tests)/[\w/]+\.py)::([\w.]+)`", page.read_text()):
        source = ROOT / path
        assert source.is_file(), f"{page.name}: {path}"
        head = re.escape(name.split(".")[0])
        assert re.search(rf"^\s*(?:async def|def|class)\s+{head}\b|^\s*{head}\s*[:=]", source.read_text(), re.MULTILINE), (
            f"{page.name}: {path}::{name}"
        )
