"""Run directories written by the last two released layouts (tests/fixtures/old-runs: af5b61e, and bce4546 from
just before schema_version) resume and finish with this code as the code that wrote them would have."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from selfie.config.compat import SCHEMA_VERSION, RunState, config_hash, upgrade_run
from selfie.io import read_jsonl
from selfie.run.rundir import load_run_config
from selfie.run.status import status_text

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "old-runs"
INPUTS = FIXTURES / "inputs"  # what both were made from: recipe.yaml, the model, prompts, seed pairs, gold.py
LAYOUTS = ("af5b61e", "bce4546")
PLAN = [(0, "init"), (0, "seed")] + [(t, s) for t in (1, 2) for s in ("generate", "judge", "train", "eval")]


def digests(run_dir: Path) -> dict[str, str]:
    """Content hash of every file of the stages the old run completed (iteration 2 was under way)."""
    files = [p for p in run_dir.rglob("*") if p.is_file() and p.relative_to(run_dir).parts[0] != "iter_002"]
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def selfie_run(work: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"WANDB_MODE": "offline", "PYTHONPATH": f"{ROOT}{os.pathsep}{work}"}  # gold.py is in `work`
    return subprocess.run(
        [sys.executable, "-m", "selfie.cli.main", "run", "recipe.yaml", *args], cwd=work, env=env, capture_output=True, text=True
    )


def copy_layout(layout: str, work: Path, ignore=None) -> Path:
    """The inputs and `layout`'s run directory, as they were when it was killed, in `work`."""
    shutil.copytree(INPUTS, work)
    shutil.copytree(FIXTURES / layout / "run", work / "run", ignore=ignore)
    return work


@pytest.fixture(scope="module", params=LAYOUTS)
def resumed(request, tmp_path_factory) -> tuple[str, Path, dict[str, str], subprocess.CompletedProcess]:
    work = copy_layout(request.param, tmp_path_factory.mktemp("old") / request.param)
    before = digests(work / "run")
    return request.param, work, before, selfie_run(work)


def test_an_old_run_directory_resumes_to_the_end(resumed):
    layout, work, before, result = resumed
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = work / "run"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [(s["iteration"], s["stage"]) for s in manifest["stages"]] == PLAN
    after = digests(run_dir)
    # trainer checkpoints of recorded stages are only resume points: this version deletes them (train.keep_checkpoints)
    dropped = {k for k in before if "checkpoints" in Path(k).parts}
    assert bool(dropped) == (layout == "af5b61e") and not dropped & set(after)  # bce4546 deleted them itself
    kept = {k for k in before if k not in ("config.yaml", "manifest.json", ".lock")} - dropped
    assert {k: after[k] for k in kept} == {k: before[k] for k in kept}  # nothing the old run completed was redone
    assert not list(run_dir.rglob("*.partial"))
    # config.yaml and the manifest's hash are now in this version's form: no judge.beta, typed init and eval
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert "beta" not in written["judge"] and written["init"]["finder"] == "svd" and written["eval"]["baseline"] == "init"
    assert manifest["config_hash"] == config_hash(load_run_config(run_dir))
    assert manifest["schema_version"] == SCHEMA_VERSION


def test_the_resumed_iteration_is_what_the_old_code_would_have_written(resumed):
    layout, work, _, result = resumed
    assert result.returncode == 0, result.stderr[-4000:]
    it = work / "run" / "iter_002"
    expected = FIXTURES / layout / "expected" / "iter_002"
    assert read_jsonl(it / "responses.jsonl") == read_jsonl(expected / "responses.jsonl")
    got_pairs, want_pairs = read_jsonl(it / "pairs.jsonl"), read_jsonl(expected / "pairs.jsonl")
    # the margin is a difference of judged rewards, which are compared to 1e-4 below: its last digit may differ
    assert [{**p, "margin": None} for p in got_pairs] == [{**p, "margin": None} for p in want_pairs]
    assert [p["margin"] for p in got_pairs] == pytest.approx([p["margin"] for p in want_pairs], abs=1e-4)
    for got, want in zip(read_jsonl(it / "judgments.jsonl"), read_jsonl(expected / "judgments.jsonl"), strict=True):
        assert got.keys() == want.keys() and got["num_tokens"] == want["num_tokens"]
        for key in ("rewards", "policy_logps", "reference_logps"):
            assert got[key] == pytest.approx(want[key], abs=1e-4)
    got, want = load_file(it / "adapter" / "adapter_model.safetensors"), load_file(expected / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-4, msg=key)
    assert read_jsonl(it / "eval" / "scores.jsonl") == read_jsonl(expected / "eval" / "scores.jsonl")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_upgrade_from_version_0_takes_the_old_manifests_hash_to_this_versions(layout):
    run_dir = FIXTURES / layout / "run"
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "schema_version" not in manifest and ("beta" in written["judge"]) == (layout == "af5b61e")
    own = load_run_config(run_dir)  # resumed with its own recipe
    upgraded = upgrade_run(RunState(written, manifest["config_hash"]), 0, own)
    assert upgraded.config_hash == config_hash(own) and not upgraded.not_reproduced
    # af5b61e hashed config.yaml as written, so the upgrade is what resumes it; bce4546 already hashed as this version
    assert (manifest["config_hash"] == upgraded.config_hash) == (layout == "bce4546")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_status_reads_the_old_run_directory_as_it_is(layout):
    out = status_text(FIXTURES / layout / "run")
    assert (
        "6/10 stages done" in out
        and "next  iter  2  generate  (resumes inside)  (in progress: iter_002/responses.jsonl.partial)" in out
    )


def test_an_old_run_judged_with_another_beta_is_refused_naming_judge_beta(tmp_path):
    work = copy_layout("af5b61e", tmp_path / "af5b61e", ignore=shutil.ignore_patterns("iter_*", "init"))
    config = work / "run" / "config.yaml"
    config.write_text(config.read_text().replace("judge:\n  beta: 0.1\n", "judge:\n  beta: 0.2\n"))
    before = digests(work / "run")
    result = selfie_run(work)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "judge.beta (the run judged with beta 0.2; this version judges with train.beta, 0.1)" in line
    assert line.endswith("use the same recipe, a new output_dir, or --force")
    after = digests(work / "run")  # refused before anything was written (the lock file holds the new pid)
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}
