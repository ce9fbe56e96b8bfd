import json
import os
import signal
import subprocess
import sys
import time

import pytest

from selfie.config.compat import HARMLESS_KEYS, SCHEMA_VERSION, UPGRADES, config_hash
from selfie.config.loader import load_recipe
from selfie.errors import SelfieError
from selfie.run.lock import RunLock, output_lock
from selfie.run.rundir import Manifest, RunContext, load_run_config, open_run

from tiny import held_output_lock


def test_manifest_records_atomically_and_rejects_corruption(tmp_path):
    manifest = Manifest.load(tmp_path / "manifest.json", "abc")
    (tmp_path / "iter_000" / "adapter").mkdir(parents=True)
    manifest.record(0, "seed", ["iter_000/adapter"])
    again = Manifest.load(tmp_path / "manifest.json", "abc")
    assert again.is_done(0, "seed") and not again.is_done(1, "generate")
    assert again.next_stage([(0, "seed"), (1, "generate")]) == (1, "generate")
    (tmp_path / "manifest.json").write_text('{"config_hash": "abc", "stages": [{"iteration": 0}]')
    with pytest.raises(SelfieError, match=r"manifest.json: not valid JSON"):
        Manifest.load(tmp_path / "manifest.json", "abc")
    (tmp_path / "manifest.json").write_text(
        '{"config_hash": "abc", "stages": [{"iteration": 0, "stage": "bake", "status": "done"}]}'
    )
    with pytest.raises(SelfieError, match=r"corrupt manifest entry stages\[0\]"):
        Manifest.load(tmp_path / "manifest.json", "abc")


def open_run_at(run_dir, config, force):
    return open_run(RunContext(config, run_dir), force)


def recipe(run_dir, *overrides):
    return load_recipe(None, [f"--output_dir={run_dir}", *overrides])


def test_config_mismatch_is_refused_unless_forced_and_force_records_what_changed(tmp_path):
    config = recipe(tmp_path)
    open_run_at(tmp_path, config, force=False).record(0, "seed", [])
    open_run_at(tmp_path, recipe(tmp_path, "--report_to", "[]"), force=False)  # logging-only keys may differ
    other = recipe(tmp_path, "--train.beta", "0.3", "--generate.top_p", "0.9")
    with pytest.raises(SelfieError, match=r"differs from the run's own config.yaml in generate.top_p, train.beta"):
        open_run_at(tmp_path, other, force=False)
    assert open_run_at(tmp_path, other, force=True).is_done(0, "seed")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config_hash"] == config_hash(other) and load_run_config(tmp_path).train.beta == 0.3
    (change,) = manifest["config_history"]
    assert change["from"] == config_hash(config) and change["to"] == config_hash(other) and change["stages_done"] == 1
    assert change["changed"] == {"generate.top_p": [1.0, 0.9], "train.beta": [0.1, 0.3]}
    open_run_at(tmp_path, other, force=False)  # the forced recipe is now the run's own
    with pytest.raises(SelfieError, match=r"differs from the run's own config.yaml in generate.top_p, train.beta"):
        open_run_at(tmp_path, config, force=False)


def test_a_kill_between_the_forced_manifest_and_config_yaml_keeps_the_manifests_recipe(tmp_path):
    old, new = recipe(tmp_path), recipe(tmp_path, "--train.beta", "0.3")
    open_run_at(tmp_path, old, force=False)
    stale = (tmp_path / "config.yaml").read_text()
    open_run_at(tmp_path, new, force=True)
    (tmp_path / "config.yaml").write_text(stale)  # as if killed after the manifest was saved
    open_run_at(tmp_path, new, force=False)
    assert load_run_config(tmp_path).train.beta == 0.3


def test_a_run_resumes_with_its_own_config_yaml_as_the_recipe(tmp_path):
    config = recipe(tmp_path)  # data sizes at their defaults: ints, which config.yaml gives back as floats
    open_run_at(tmp_path, config, force=False).record(0, "seed", [])
    own = load_recipe(tmp_path / "config.yaml", [])
    assert own.data.seed_size == config.data.seed_size and repr(own.data.seed_size) != repr(config.data.seed_size)
    assert open_run_at(tmp_path, own, force=False).is_done(0, "seed")


def test_a_manifest_hashed_before_equal_numbers_hashed_alike_resumes_and_takes_the_new_hash(tmp_path):
    config = recipe(tmp_path)
    open_run_at(tmp_path, config, force=False).record(0, "seed", [])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["schema_version"]  # as the versions before it wrote the manifest
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "config_hash": config_hash(config, exact_numbers=True)}))
    assert open_run_at(tmp_path, config, force=False).is_done(0, "seed")
    upgraded = json.loads((tmp_path / "manifest.json").read_text())
    assert upgraded["config_hash"] == config_hash(config) != config_hash(config, exact_numbers=True)
    assert upgraded["schema_version"] == SCHEMA_VERSION == len(UPGRADES)


def test_a_manifest_of_this_version_is_taken_at_its_word_not_guessed_at(tmp_path):
    config = recipe(tmp_path)
    open_run_at(tmp_path, config, force=False).record(0, "seed", [])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION
    # the hash an earlier layout would have written: this version's manifest does not hold it, so it is another recipe's
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "config_hash": config_hash(config, exact_numbers=True)}))
    with pytest.raises(SelfieError, match="made by a different recipe"):
        open_run_at(tmp_path, config, force=False)


def test_a_manifest_of_a_later_layout_is_refused_naming_its_schema_version(tmp_path):
    config = recipe(tmp_path)
    open_run_at(tmp_path, config, force=False).record(0, "seed", [])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(SelfieError, match=rf"manifest.json: schema_version {SCHEMA_VERSION + 1}: not a layout this selfie reads"):
        open_run_at(tmp_path, config, force=False)


def test_a_moved_run_directory_resumes_and_an_old_hash_with_output_dir_is_accepted(tmp_path):
    first, moved = tmp_path / "first", tmp_path / "moved"
    config = recipe(first)
    open_run_at(first, config, force=False).record(0, "seed", [])
    manifest = json.loads((first / "manifest.json").read_text())
    # as the manifest was written before output_dir left the hash (no checksums, no history either)
    manifest = {"config_hash": config_hash(config, leave_out=HARMLESS_KEYS, exact_numbers=True), "stages": manifest["stages"]}
    (first / "manifest.json").write_text(json.dumps(manifest))
    first.rename(moved)
    assert open_run_at(moved, recipe(moved), force=False).is_done(0, "seed")
    assert json.loads((moved / "manifest.json").read_text())["config_hash"] == config_hash(config)
    assert load_run_config(moved).output_dir == str(moved)


def make_artifacts(run_dir):
    (run_dir / "iter_001").mkdir(parents=True)
    (run_dir / "iter_001" / "responses.jsonl").write_text("".join(json.dumps({"prompt_id": str(i)}) + "\n" for i in range(6)))
    adapter = run_dir / "iter_001" / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    (adapter / "README.md").write_text("not a weight file")
    return run_dir / "iter_001" / "responses.jsonl", adapter


def test_a_changed_artifact_is_named_and_old_entries_get_checksums_once(tmp_path):
    responses, adapter = make_artifacts(tmp_path)
    manifest = Manifest.load(tmp_path / "manifest.json", "abc")
    manifest.record(1, "generate", ["iter_001/responses.jsonl"])
    manifest.stages.append({"iteration": 1, "stage": "train", "status": "done", "artifacts": ["iter_001/adapter"]})  # no checksum
    assert manifest.stages[0]["checksums"]["iter_001/responses.jsonl"]["rows"] == 6
    assert manifest.verify() == 1 and "iter_001/adapter" in manifest.stages[1]["checksums"]
    assert manifest.verify() == 0
    (adapter / "README.md").write_text("edited")  # only the weights count
    manifest.verify()
    (adapter / "adapter_model.safetensors").write_bytes(b"other weights")
    with pytest.raises(SelfieError, match=r"iter_001/adapter: changed since it was recorded .*iteration 1's train stage"):
        manifest.verify()
    responses.write_text("".join(responses.read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(SelfieError, match=r"responses.jsonl: changed since it was recorded \(6 rows, sha256 \w+ then, 3 rows"):
        manifest.verify()
    responses.unlink()
    with pytest.raises(
        SelfieError, match=r"responses.jsonl: missing; the manifest records it as the output of iteration 1's generate"
    ):
        manifest.verify()


def test_resume_removes_what_killed_runs_left_and_the_checkpoints_of_recorded_stages(tmp_path):
    config = recipe(tmp_path)
    leftovers = [
        tmp_path / "iter_001" / ".responses.jsonl.k2j3.tmp",
        tmp_path / "iter_001" / ".adapter.x8y7.tmp",
        tmp_path / "iter_002" / ".adapter.ab12cd34",
        tmp_path / ".summary.png.tmp",
        tmp_path / "iter_002" / "checkpoints" / "checkpoint-3",
    ]  # cut before its refine_state.json
    kept = [
        tmp_path / "iter_002" / "responses.jsonl.partial",
        tmp_path / "wandb" / ".x.tmp",
        tmp_path / "iter_002" / "checkpoints" / "checkpoint-2" / "refine_state.json",
        tmp_path / "iter_002" / ".note",
    ]
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if path.name.startswith((".adapter", "checkpoint")) else path.write_text("x")
    (tmp_path / "iter_001" / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    open_run_at(tmp_path, config, force=False).record(1, "train", [])
    open_run_at(tmp_path, config, force=False)
    assert not [p for p in leftovers if p.exists()] and all(p.exists() for p in kept)
    assert not (tmp_path / "iter_001" / "checkpoints").exists()  # iteration 1's adapter is recorded
    RunContext(recipe(tmp_path, "--train.keep_checkpoints", "true"), tmp_path).drop_checkpoints(
        open_run_at(tmp_path, config, force=False)
    )
    (tmp_path / "iter_001" / "checkpoints").mkdir()
    open_run_at(tmp_path, recipe(tmp_path, "--train.keep_checkpoints", "true"), force=False)
    assert (tmp_path / "iter_001" / "checkpoints").exists()


def test_lock_refuses_a_second_holder_and_recovers_from_a_killed_one(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from selfie.run.lock import RunLock; from pathlib import Path; import time; "
            f"RunLock(Path({str(tmp_path)!r})).acquire(); print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(SelfieError, match=rf"in use by pid {holder.pid}"):
        RunLock(tmp_path).acquire()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    time.sleep(0.1)
    lock = RunLock(tmp_path)
    lock.acquire()  # the stale lock file is still there; the kernel released the dead holder's flock
    assert (tmp_path / ".lock").read_text() == str(os.getpid())
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_an_output_lock_refuses_a_second_writer_and_leaves_no_file(tmp_path):
    output = tmp_path / "out" / "responses.jsonl"
    with held_output_lock(output) as holder:
        with pytest.raises(SelfieError, match=rf"responses.jsonl: output is in use by pid {holder.pid}"):
            with output_lock(output):
                pass
    with output_lock(output):
        assert (tmp_path / "out" / ".responses.jsonl.lock").read_text() == str(os.getpid())
    assert list((tmp_path / "out").iterdir()) == []


def test_an_output_directory_under_a_file_is_one_line_and_exit_2(tmp_path, capsys):
    from selfie.cli.main import main

    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "recipe.yaml").write_text("num_iterations: 0\n")
    code = main(
        [
            "run",
            str(tmp_path / "recipe.yaml"),
            "--output_dir",
            str(tmp_path / "a-file" / "run"),
            "--report_to",
            "[]",
            "--num_iterations",
            "0",
            "--data.iteration_sizes",
            "[]",
            "--data.seed_pairs",
            "demo-seed",
            "--data.seed_size",
            "0",
            "--model.name",
            "/nonexistent-model-never-loaded",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("selfie: error: ") and "a-file is a file, not a directory" in err
