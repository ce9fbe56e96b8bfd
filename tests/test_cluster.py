"""Running on a cluster: the run lock on filesystems without flock, judge-spec scoring sharded over the ranks and
resumable inside the stage, the multi-node accelerate config and the SLURM launcher."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from launcher import accelerate_launch

from selfie.errors import SelfieError
from selfie.io import atomic_write_jsonl, read_jsonl
from selfie.run.lock import RunLock, process_start

ROOT = Path(__file__).parent.parent
CONFIGS = ROOT / "accelerate_configs"
# a child holding a run lock with flock refused, as on an NFS mount without its lock daemon
NO_FLOCK_HOLDER = """
import errno, fcntl, sys, time
from pathlib import Path
def no_locks(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")
if sys.argv[2] == "nolock":
    fcntl.flock = no_locks
from selfie.run.lock import RunLock
RunLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def no_locks(fd: int, operation: int) -> None:
    raise OSError(errno.ENOLCK, "No locks available")


@pytest.fixture
def without_flock(monkeypatch):
    """This process on a filesystem whose flock is refused (ENOLCK)."""
    monkeypatch.setattr(fcntl, "flock", no_locks)


def hold(run_dir: Path, mode: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", NO_FLOCK_HOLDER, str(run_dir), mode], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_without_flock_a_second_holder_is_refused_and_a_killed_ones_lock_is_taken_over(without_flock, tmp_path):
    holder = hold(tmp_path, "nolock")
    try:
        owner = tmp_path / ".lock.owner"
        assert owner.read_text() == f"{holder.pid} {socket.gethostname()} {process_start(holder.pid)}\n"
        with pytest.raises(
            SelfieError, match=rf"{tmp_path}: run directory is in use by pid {holder.pid}; wait for it or stop it$"
        ):
            RunLock(tmp_path).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    lock = RunLock(tmp_path)
    lock.acquire()  # the killed holder's owner file is still there: its process is gone from this host
    assert owner.read_text().split()[0] == str(os.getpid())
    with pytest.raises(SelfieError, match=rf"in use by pid {os.getpid()}"):  # a second lock in this very process
        RunLock(tmp_path).acquire()
    lock.release()
    assert not owner.exists() and not list(tmp_path.glob("*.tmp"))


def test_without_flock_a_reused_pid_does_not_hold_the_lock(without_flock, tmp_path):
    owner = tmp_path / ".lock.owner"
    owner.write_text(f"{os.getpid()} {socket.gethostname()} 1\n")  # this pid, but a process that started at tick 1
    lock = RunLock(tmp_path)
    lock.acquire()
    assert owner.read_text() == f"{os.getpid()} {socket.gethostname()} {process_start(os.getpid())}\n"
    lock.release()


def test_without_flock_another_hosts_lock_is_refused_naming_the_file_to_remove(without_flock, tmp_path):
    owner = tmp_path / ".lock.owner"
    owner.write_text("4242 gpu-node-17 12345\n")
    with pytest.raises(SelfieError, match=rf"in use by pid 4242 on gpu-node-17 \(if nothing runs there, remove {owner}\)"):
        RunLock(tmp_path).acquire()
    assert owner.read_text() == "4242 gpu-node-17 12345\n"


def test_without_flock_an_owner_file_naming_no_holder_is_refused_saying_what_to_do(without_flock, tmp_path):
    (tmp_path / ".lock.owner").write_text("")  # a holder killed between creating the file and writing it
    with pytest.raises(SelfieError, match=r"names no holder yet\); if nothing runs on it, remove that file$"):
        RunLock(tmp_path).acquire()


def test_with_flock_a_holder_whose_mount_refuses_flock_is_still_honoured(tmp_path):
    holder = hold(tmp_path, "nolock")
    try:
        with pytest.raises(SelfieError, match=rf"in use by pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    lock = RunLock(tmp_path)
    lock.acquire()  # flock works here; the dead holder's owner file goes
    assert (tmp_path / ".lock").read_text() == str(os.getpid()) and not (tmp_path / ".lock.owner").exists()
    lock.release()


def test_a_filesystem_refusing_flock_and_exclusive_creation_is_one_line(without_flock, monkeypatch, tmp_path):
    def no_exclusive_create(path):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported", str(path))

    monkeypatch.setattr("selfie.run.lock.create_exclusive", no_exclusive_create)
    with pytest.raises(SelfieError) as error:
        RunLock(tmp_path).acquire()
    assert str(error.value) == (
        f"{tmp_path / '.lock'}: cannot lock the run directory: its filesystem refuses flock (No locks available) and "
        "exclusive file creation (Operation not supported); put it on a filesystem with working locks "
        "(use a local disk, NFS with its lock daemon, or Lustre mounted with -o flock)"
    )
    assert not (tmp_path / ".lock.owner").exists()


# ---- judge-spec scoring over the ranks -----------------------------------------------------------------

JUDGES = """
import os, time
calls = 0

def vowels(prompt, response):
    # logs every call; with STALL_AFTER set, hangs on the call after that many (to be killed there)
    global calls
    calls += 1
    with open(os.environ["JUDGE_LOG"], "a") as f:
        f.write(prompt[-1]["content"] + "\\n")
    if calls > int(os.environ.get("STALL_AFTER", "1000000000")):
        time.sleep(600)
    return float(sum(ch in "aeiou" for ch in response))

def fails_on_topic_7(prompt, response):
    if prompt[-1]["content"].endswith(" 7"):
        raise ValueError("no score for topic 7")
    return 1.0
"""


@pytest.fixture
def scoring(tmp_path) -> tuple[Path, dict]:
    """100 prompts x 2 responses to score, and the environment that finds the test judges."""
    (tmp_path / "cluster_judges.py").write_text(textwrap.dedent(JUDGES))
    responses = tmp_path / "responses.jsonl"
    words = ["sea and sky", "a fox", "the sun rises", "apples", "rain on the road", "hello world"]
    rows = [
        {
            "prompt_id": f"p{i:03d}",
            "prompt": [{"role": "user", "content": f"write about topic {i}"}],
            "responses": [words[i % 6], words[(i * 5 + 1) % 6] + " again" * (i % 3)],
            "finished": [True, i % 2 == 0],
        }
        for i in range(100)
    ]
    atomic_write_jsonl(responses, rows)
    env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return responses, env


def score(tiny_model, responses, run_dir, spec, env, launch=(), **popen) -> subprocess.Popen:
    """tests/label_stage.py alone, or under `launch`: a launcher given the script (scripts/launch/multi_node.slurm takes it
    from SELFIE_SCRIPT)."""
    script = [] if env.get("SELFIE_SCRIPT") else [str(ROOT / "tests" / "label_stage.py")]
    cmd = [*(launch or [sys.executable]), *script, tiny_model, str(responses), str(run_dir), spec]
    return subprocess.Popen(cmd, text=True, cwd=ROOT, env=env, **popen)


def scored(*args, timeout: float = 600, **kwargs) -> dict:
    """`score` run to its end: the stage metrics rank 0 printed."""
    proc = score(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def accelerate(config: Path, *args: str) -> tuple[str, ...]:
    return tuple(accelerate_launch(config, *args))


def logged_calls(log: Path) -> Counter:
    return Counter(log.read_text().splitlines()) if log.exists() else Counter()


def test_scoring_killed_mid_stage_resumes_from_the_rows_written_without_scoring_twice(tiny_model, scoring, tmp_path):
    responses, env = scoring
    spec, run_dir, first, second = (
        "callable:cluster_judges:vowels",
        tmp_path / "run",
        tmp_path / "first.log",
        tmp_path / "second.log",
    )
    judgments = run_dir / "iter_001" / "judgments.jsonl"
    partial = judgments.with_name("judgments.jsonl.partial")
    proc = score(tiny_model, responses, run_dir, spec, env | {"JUDGE_LOG": str(first), "STALL_AFTER": "64"})
    deadline = time.monotonic() + 300
    while not (partial.exists() and partial.read_text().count("\n") >= 32):  # the first 32 prompts (64 responses)
        assert proc.poll() is None and time.monotonic() < deadline, "the scoring did not get to its first write"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(read_jsonl(partial)) == 32 and not judgments.exists()

    assert scored(tiny_model, responses, run_dir, spec, env | {"JUDGE_LOG": str(second)})["resumed"] == 32
    rescored = logged_calls(second)
    assert set(rescored) == {f"write about topic {i}" for i in range(32, 100)} and set(rescored.values()) == {2}
    assert [row["prompt_id"] for row in read_jsonl(judgments)] == [f"p{i:03d}" for i in range(100)]
    assert not partial.exists()
    scored(tiny_model, responses, tmp_path / "reference", spec, env | {"JUDGE_LOG": str(tmp_path / "reference.log")})
    assert judgments.read_bytes() == (tmp_path / "reference" / "iter_001" / "judgments.jsonl").read_bytes()


FAKE_SLURM = {  # stand-ins for a 2-node allocation on this one machine: srun starts its command once per "node"
    "srun": """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node SLURM_PROCID=$node "$@" & pids+=($!); done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
""",
    "scontrol": "#!/bin/bash\necho 127.0.0.1\necho 127.0.0.1\n",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_job(tmp_path: Path, env: dict) -> tuple[tuple[str, ...], dict]:
    """scripts/launch/multi_node.slurm of tests/label_stage.py as a 2-node job of 1 process per node, both on this machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    job = {"SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2", "GPUS_PER_NODE": "1", "PYTHON": sys.executable}
    job |= {"PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "MAIN_PROCESS_PORT": str(free_port())}
    return ("bash", str(ROOT / "scripts" / "launch" / "multi_node.slurm")), env | job | {
        "SELFIE_SCRIPT": str(ROOT / "tests" / "label_stage.py")
    }


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["multi_gpu", "slurm_2_nodes"])
def test_two_rank_scoring_equals_one_process_and_scores_each_response_once(launcher, tiny_model, scoring, tmp_path):
    responses, env = scoring
    spec, log = "callable:cluster_judges:vowels", tmp_path / "ranks.log"
    if launcher == "multi_gpu":
        launch, launch_env = accelerate(CONFIGS / "multi_gpu.yaml", "--num_processes", "2"), env
    else:
        launch, launch_env = slurm_job(tmp_path, env)
    metrics = scored(tiny_model, responses, tmp_path / "ranks", spec, launch_env | {"JUDGE_LOG": str(log)}, launch)
    assert metrics["prompts"] == 100 and metrics["resumed"] == 0
    calls = logged_calls(log)
    assert len(calls) == 100 and set(calls.values()) == {2}  # each rank scored its own prompts only
    scored(tiny_model, responses, tmp_path / "one", spec, env | {"JUDGE_LOG": str(tmp_path / "one.log")})
    ranks, one = tmp_path / "ranks" / "iter_001", tmp_path / "one" / "iter_001"
    assert (ranks / "judgments.jsonl").read_bytes() == (one / "judgments.jsonl").read_bytes()
    assert sorted(p.name for p in ranks.iterdir()) == ["judgments.jsonl"]  # the shards merged and gone


@pytest.mark.slow
def test_a_judge_failing_on_one_ranks_row_stops_every_rank_with_its_line(tiny_model, scoring, tmp_path):
    responses, env = scoring
    launch = accelerate(CONFIGS / "multi_gpu.yaml", "--num_processes", "2")
    proc = score(
        tiny_model, responses, tmp_path / "run", "callable:cluster_judges:fails_on_topic_7", env, launch, stderr=subprocess.PIPE
    )
    _, err = proc.communicate(timeout=300)
    line = "selfie: error: judge 'callable:cluster_judges:fails_on_topic_7' raised ValueError: no score for topic 7"
    # both ranks stop with the line: rank 0 is not left waiting for rank 1's shard (to be killed by the launcher)
    assert proc.returncode != 0 and err.count(line) == 2, err[-4000:]
