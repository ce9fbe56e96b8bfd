"""The whole SPA loop on the tiny model: full run, kills and resumes, refusals, tracking, 2 processes."""

from __future__ import annotations

import filecmp
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from launcher import accelerate_launch
from safetensors.torch import load_file

from selfie.cli.main import main
from selfie.config.compat import HARMLESS_KEYS, config_hash
from selfie.config.loader import load_recipe
from selfie.io import read_jsonl
from selfie.run.rundir import RunContext

from tiny import PAIR_KEYS, TOPICS

ROOT = Path(__file__).parent.parent
STAGE_FILES = ["responses.jsonl", "judgments.jsonl", "pairs.jsonl"]


def write_inputs(directory: Path) -> tuple[Path, Path]:
    prompts = directory / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"write about {t} please"}) + "\n" for t in TOPICS))
    seed = directory / "seed.jsonl"
    seed.write_text(
        "".join(
            json.dumps({"prompt": f"say something about {t}", "chosen": "yes, thank you", "rejected": "no bad"}) + "\n"
            for t in TOPICS[:8]
        )
    )
    return prompts, seed


def write_recipe(directory: Path, model: str, prompts: Path, seed: Path) -> Path:
    recipe = {
        "num_iterations": 2,
        "report_to": ["wandb"],
        "model": {"name": model},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"prompts": str(prompts), "seed_pairs": str(seed), "seed_size": 0, "iteration_sizes": [6, 6]},
        "generate": {"max_new_tokens": 12, "batch_size": 2},
        "judge": {"truncated": "keep", "length_penalty": 0.0},  # a random tiny model rarely stops within 12 tokens
        "train": {
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-3,
            "seed_epochs": 1,
            "save_steps": 1,
            "max_length": 128,
        },
    }
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def recipe_args(recipe: Path, run_dir: Path, *extra: str) -> list[str]:
    return [str(recipe), "--output_dir", str(run_dir), *extra]


def selfie_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "selfie.cli.main", *args]


def run_selfie(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        selfie_cmd(*args), capture_output=True, text=True, cwd=ROOT, env=os.environ | {"WANDB_MODE": "offline"}
    )
    if check and result.returncode != 0:
        raise AssertionError(result.stderr[-4000:])
    return result


def run_two_ranks(recipe: Path, run_dir: Path, *extra: str) -> None:
    """`selfie run` as 2 processes under accelerate (multi_gpu.yaml, gloo on CPU), 1 pair per rank and step: the
    single-process tests' global batch of 2."""
    cmd = accelerate_launch(
        ROOT / "accelerate_configs" / "multi_gpu.yaml",
        str(ROOT / "scripts" / "launch" / "run_spa.py"),
        *recipe_args(recipe, run_dir, *extra, "--train.per_device_train_batch_size", "1"),
    )
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ | {"WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def recipe(tiny_model, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("inputs")
    return write_recipe(directory, tiny_model, *write_inputs(directory))


@pytest.fixture(scope="module")
def reference_run(recipe, tmp_path_factory):
    """One uninterrupted run: the baseline every resumed run must reproduce."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    result = run_selfie("run", *recipe_args(recipe, run_dir))
    return run_dir, result.stdout


def adapter_tensors(run_dir: Path, iteration: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / f"iter_{iteration:03d}" / "adapter" / "adapter_model.safetensors")


def assert_same_run(a: Path, b: Path) -> None:
    for t in (1, 2):
        for name in STAGE_FILES:
            assert filecmp.cmp(a / f"iter_{t:03d}" / name, b / f"iter_{t:03d}" / name, shallow=False), f"iter {t} {name}"
    for t in (0, 1, 2):
        ta, tb = adapter_tensors(a, t), adapter_tensors(b, t)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"iter {t} {key}"


def test_full_run_writes_the_run_directory_contract(reference_run):
    run_dir, stdout = reference_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [(s["iteration"], s["stage"]) for s in manifest["stages"]] == [
        (0, "seed"),
        (1, "generate"),
        (1, "judge"),
        (1, "train"),
        (2, "generate"),
        (2, "judge"),
        (2, "train"),
    ]
    assert all(s["status"] == "done" for s in manifest["stages"])
    for t in (1, 2):
        it = run_dir / f"iter_{t:03d}"
        responses = read_jsonl(it / "responses.jsonl")
        assert len(responses) == 6 and all(set(r) == {"prompt_id", "prompt", "responses", "finished"} for r in responses)
        judgments = read_jsonl(it / "judgments.jsonl")
        assert all(set(r) == {"prompt_id", "rewards", "policy_logps", "reference_logps", "num_tokens"} for r in judgments)
        for pair in read_jsonl(it / "pairs.jsonl"):
            assert set(pair) == PAIR_KEYS
            assert pair["chosen"][0]["role"] == "assistant" and pair["margin"] >= 0
        assert (it / "adapter" / "adapter_config.json").is_file()
        metrics = json.loads((it / "metrics.json").read_text())
        assert {"generate", "judge", "train", "times"} <= set(metrics)
    assert "pairs kept" in stdout and (run_dir / "summary.md").is_file() and (run_dir / "summary.png").stat().st_size > 0
    assert not list(run_dir.rglob("*.partial")) and not list(run_dir.rglob(".*.tmp"))
    # every artifact with its checksum; trainer checkpoints go once the adapter is recorded; the lock once the run ends
    ctx = RunContext.load(run_dir)
    for entry in manifest["stages"]:
        declared = {ctx.relative(path) for path in ctx.artifacts(entry["iteration"], entry["stage"])}
        assert set(entry["checksums"]) == set(entry["artifacts"]) == declared
    assert manifest["stages"][1]["checksums"]["iter_001/responses.jsonl"]["rows"] == 6
    assert not list(run_dir.glob("iter_*/checkpoints")) and not (run_dir / ".lock").exists()


def test_status_reports_a_finished_run(reference_run):
    run_dir, _ = reference_run
    out = run_selfie("status", str(run_dir)).stdout
    assert "7/7 stages done" in out and "complete" in out and "iter_001/responses.jsonl (6 rows)" in out


def test_wandb_offline_run_files_hold_the_metrics(reference_run):
    run_dir, _ = reference_run
    runs = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 3  # one wandb run per iteration (seed, 1, 2)
    data = runs[-1].read_bytes()
    for key in (b"refine/tau", b"refine/smoothed_fraction", b"judge/pairs", b"generate/tokens_per_second"):
        assert key in data, key


def _wait_for(proc: subprocess.Popen, condition, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the kill point: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            raise AssertionError("kill point never reached")
        time.sleep(0.005)
    proc.send_signal(signal.SIGSTOP)  # freeze at once, then kill: what we saw is what it left
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _partial_rows(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


KILL_POINTS = {
    "during-generation": lambda run: _partial_rows(run / "iter_001" / "responses.jsonl.partial") >= 1,
    "between-stages": lambda run: '"judge"' in (run / "manifest.json").read_text() if (run / "manifest.json").exists() else False,
    "during-training": lambda run: any((run / "iter_002").glob("**/checkpoint-1")),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_rerun_matches_the_uninterrupted_run(point, recipe, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    args = ["run", *recipe_args(recipe, run_dir)]
    proc = subprocess.Popen(
        selfie_cmd(*args),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"WANDB_MODE": "offline"},
    )
    _wait_for(proc, lambda: KILL_POINTS[point](run_dir))
    assert proc.returncode == -signal.SIGKILL
    run_selfie(*args)
    assert_same_run(reference_run[0], run_dir)


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    """The run directory somewhere else (a moved run), with its own files."""
    copy = tmp_path / "moved"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("wandb"))
    return copy


def selfie_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_dry_run_of_a_finished_run_shows_every_stage_done_and_touches_nothing(recipe, reference_run, capsys):
    run_dir, _ = reference_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    code, out, _ = selfie_main(capsys, "run", *recipe_args(recipe, run_dir), "--dry-run")
    assert code == 0 and "exists, 7 of 7 stages done" in out
    assert sum(" done " in line for line in out.splitlines()) == 7
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_a_moved_run_resumes_and_a_cut_artifact_stops_it_naming_the_file(recipe, reference_run, tmp_path, capsys):
    moved = copy_run(reference_run[0], tmp_path)
    code, out, err = selfie_main(capsys, "run", str(recipe), "--output_dir", str(moved), "--report_to", "[]")
    assert code == 0 and "pairs kept" in out, err
    responses = moved / "iter_001" / "responses.jsonl"
    responses.write_text("".join(responses.read_text().splitlines(keepends=True)[:3]))
    code, _, err = selfie_main(capsys, "run", str(recipe), "--output_dir", str(moved), "--report_to", "[]")
    assert code == 2 and err.count("\n") == 1
    assert f"{responses}: changed since it was recorded (6 rows, sha256 " in err and "then, 3 rows, sha256" in err
    assert "iter_001/responses.jsonl (3 rows) (changed since it was recorded)" in run_selfie("status", str(moved)).stdout


def test_a_run_directory_written_before_checksums_resumes_and_gets_them(recipe, reference_run, tmp_path, capsys):
    run_dir = reference_run[0]
    moved = copy_run(run_dir, tmp_path)
    manifest = json.loads((moved / "manifest.json").read_text())
    # the manifest as the previous version wrote it: its hash counted output_dir, no checksums, no history
    old_hash = config_hash(load_recipe(recipe, ["--output_dir", str(run_dir)]), leave_out=HARMLESS_KEYS, exact_numbers=True)
    stages = [{k: v for k, v in entry.items() if k != "checksums"} for entry in manifest["stages"]]
    (moved / "manifest.json").write_text(json.dumps({"config_hash": old_hash, "stages": stages}))
    code, _, err = selfie_main(capsys, "run", str(recipe), "--output_dir", str(moved), "--report_to", "[]")
    assert code == 0, err
    upgraded = json.loads((moved / "manifest.json").read_text())
    assert upgraded["config_hash"] == manifest["config_hash"] and upgraded["stages"] == manifest["stages"]


def test_force_on_a_finished_run_records_the_new_recipe_and_what_changed(recipe, reference_run, tmp_path, capsys):
    moved = copy_run(reference_run[0], tmp_path)
    args = [str(recipe), "--output_dir", str(moved), "--report_to", "[]"]
    assert selfie_main(capsys, "run", *args, "--train.beta", "0.2", "--force")[0] == 0
    manifest = json.loads((moved / "manifest.json").read_text())
    assert manifest["config_hash"] == config_hash(load_recipe(recipe, ["--train.beta", "0.2"]))
    assert manifest["config_history"][0]["changed"] == {"train.beta": [0.1, 0.2]}
    assert manifest["config_history"][0]["stages_done"] == 7
    assert selfie_main(capsys, "run", *args, "--train.beta", "0.2")[0] == 0  # the new recipe resumes
    code, _, err = selfie_main(capsys, "run", *args)  # the old one no longer does
    assert code == 2 and "differs from the run's own config.yaml in train.beta" in err


def test_config_mismatch_and_lock_are_refused(recipe, reference_run, tmp_path):
    run_dir, _ = reference_run
    result = run_selfie("run", *recipe_args(recipe, run_dir, "--train.beta", "0.5"), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("use the same recipe, a new output_dir, or --force")
    assert "train.beta" in result.stderr
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from selfie.run.lock import RunLock; "
            f"RunLock(Path({str(run_dir)!r})).acquire(); print('ok', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ok"
        result = run_selfie("run", *recipe_args(recipe, run_dir), check=False)
        assert result.returncode == 2 and "run directory is in use by pid" in result.stderr
    finally:
        holder.kill()
        holder.wait()


def test_two_process_run_matches_the_single_process_responses(recipe, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    run_two_ranks(recipe, run_dir)
    ref = reference_run[0]
    # 2 ranks x 1 pair: the reference run's global batch, so the same seed adapter; generation is seeded per
    # prompt, so the responses sampled from it cannot depend on the process count
    assert filecmp.cmp(ref / "iter_001" / "responses.jsonl", run_dir / "iter_001" / "responses.jsonl", shallow=False)
    assert len(read_jsonl(run_dir / "iter_002" / "pairs.jsonl")) > 0
    assert (run_dir / "iter_002" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_rerun_resumes_to_the_same_artifacts(recipe, reference_run, tmp_path):
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a small disk: no private mount namespace (unshare -rm)")
    disk, after = tmp_path / "disk", tmp_path / "after"
    disk.mkdir()
    run = " ".join(shlex.quote(arg) for arg in selfie_cmd("run", *recipe_args(recipe, disk / "run")))
    script = (
        f"mount -t tmpfs -o size=400k tmpfs {disk} && {{ {run} >/dev/null 2>{tmp_path}/full.err; echo $? >{tmp_path}/full.rc; "
        f"mount -o remount,size=16m {disk} && {run} >/dev/null 2>{tmp_path}/rerun.err; echo $? >{tmp_path}/rerun.rc; "
        f"cp -r {disk}/run {after}; }}"
    )
    subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=os.environ | {"WANDB_MODE": "offline"}, check=True)
    err = (tmp_path / "full.err").read_text()
    errors = [line for line in err.splitlines() if line.startswith("selfie: error:")]
    assert (tmp_path / "full.rc").read_text().strip() == "2" and len(errors) == 1, err[-3000:]
    assert re.fullmatch(
        rf"selfie: error: {re.escape(str(disk))}/run: no space left on device during .*; free some space and run the same "
        r"command again: it resumes from the last completed step",
        errors[0],
    )
    assert "Traceback" not in err and "Logging error" not in err  # wandb's threads included
    assert (tmp_path / "rerun.rc").read_text().strip() == "0", (tmp_path / "rerun.err").read_text()[-3000:]
    assert_same_run(reference_run[0], after)


@pytest.mark.slow
def test_random_sigkills_then_reruns_give_the_uninterrupted_runs_artifacts(tmp_path):
    """scripts/dev/torture.py's trials until 10 kills have landed (a kill lands when the run is still going when it comes)."""
    from scripts.dev.torture import torture  # not at the top: torture imports this module

    seed = int(os.environ.get("SELFIE_TORTURE_SEED", random.SystemRandom().randrange(2**32)))
    results, _ = torture(tmp_path, trials=1, seed=seed, min_kills=10)
    assert sum(len(r.kills) for r in results) >= 10, f"seed {seed}"
    assert all(r.identical for r in results), f"seed {seed}: {[r.differences for r in results]}"
