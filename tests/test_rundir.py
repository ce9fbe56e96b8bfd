import os
import signal
import subprocess
import sys
import time

import pytest

from selfie.config import load_recipe
from selfie.errors import SelfieError
from selfie.rundir import Manifest, RunLock, check_and_write_config, open_manifest


def test_manifest_records_atomically_and_rejects_corruption(tmp_path):
    manifest = Manifest.load(tmp_path / "manifest.json", "abc")
    manifest.record(0, "seed", ["iter_000/adapter"])
    again = Manifest.load(tmp_path / "manifest.json", "abc")
    assert again.is_done(0, "seed") and not again.is_done(1, "generate")
    assert again.next_stage([(0, "seed"), (1, "generate")]) == (1, "generate")
    (tmp_path / "manifest.json").write_text('{"config_hash": "abc", "stages": [{"iteration": 0}]')
    with pytest.raises(SelfieError, match=r"manifest.json: not valid JSON"):
        Manifest.load(tmp_path / "manifest.json", "abc")
    (tmp_path / "manifest.json").write_text('{"config_hash": "abc", "stages": [{"iteration": 0, "stage": "bake", "status": "done"}]}')
    with pytest.raises(SelfieError, match=r"corrupt manifest entry stages\[0\]"):
        Manifest.load(tmp_path / "manifest.json", "abc")


def test_config_mismatch_is_refused_unless_forced(tmp_path):
    config = load_recipe(None, [f"--output_dir={tmp_path}"])
    check_and_write_config(tmp_path, config, force=False)
    open_manifest(tmp_path, config, force=False).record(0, "seed", [])
    check_and_write_config(tmp_path, load_recipe(None, [f"--output_dir={tmp_path}", "--report_to", "[]"]), force=False)
    other = load_recipe(None, [f"--output_dir={tmp_path}", "--train.beta", "0.3", "--generate.top_p", "0.9"])
    with pytest.raises(SelfieError, match=r"differs from the run's own config.yaml in generate.top_p, train.beta"):
        check_and_write_config(tmp_path, other, force=False)
    with pytest.raises(SelfieError, match="made by a different recipe"):
        open_manifest(tmp_path, other, force=False)
    check_and_write_config(tmp_path, other, force=True)
    assert open_manifest(tmp_path, other, force=True).is_done(0, "seed")


def test_lock_refuses_a_second_holder_and_recovers_from_a_killed_one(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from selfie.rundir import RunLock; from pathlib import Path; import time; "
                               f"RunLock(Path({str(tmp_path)!r})).acquire(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
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


def test_an_output_directory_under_a_file_is_one_line_and_exit_2(tmp_path, capsys):
    from selfie.cli import main

    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "recipe.yaml").write_text("num_iterations: 0\n")
    code = main(["run", str(tmp_path / "recipe.yaml"), "--output_dir", str(tmp_path / "a-file" / "run"), "--report_to", "[]", "--num_iterations", "0",
                 "--data.iteration_sizes", "[]", "--data.seed_pairs", "demo-seed", "--data.seed_size", "0",
                 "--model.name", "/nonexistent-model-never-loaded"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("selfie: error: ") and "a-file" in err and "Not a directory" in err
