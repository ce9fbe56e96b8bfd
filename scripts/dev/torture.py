"""Kill a tiny `selfie run` with SIGKILL at random points, run it again, and compare with an uninterrupted run.

A trial starts a run in a fresh directory and kills it a random time after it has taken its run directory
(uniform over what is left of the run's expected time: an uninterrupted run's at first, then averaged with
what each trial took), runs it again and kills it again, up to 4 times, then
lets the last rerun finish: that is the resume. The trial passes when every artifact (responses, judgments, pairs)
is byte-identical to the uninterrupted run's, every adapter has exactly its weights, and nothing a killed run
left behind (temporary files, partial checkpoints) remains. A kill "landed" when the process was still running
when it was stopped (SIGSTOP, then SIGKILL: what was on disk then is what the kill left).

    PYTHONPATH=tests python -m scripts.dev.torture --trials 10 --seed 0 --write docs/RELIABILITY.md

also runs the bad-input cases of tests/test_preflight.py through `selfie run` and writes the line each gives.
The tiny model and recipe are the loop tests' (tests/tiny.py, tests/test_loop.py): tests/ goes on the path as
pytest puts it there. tests/test_loop.py runs the same trials for at least 10 landed kills (`make test`).
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import io
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_preflight import CASES, make_inputs, with_paths

from selfie.cli.main import main as selfie_main
from selfie.config.loader import load_recipe
from selfie.run.rundir import RunContext

from scripts.benchlib import ROOT
from test_loop import write_inputs, write_recipe
from tiny import build_tiny_model

ENV = os.environ | {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ROW_FILES = [RunContext.responses, RunContext.judgments, RunContext.pairs]  # each iteration's, compared byte for byte


@dataclass
class Trial:
    kills: list[str] = field(default_factory=list)  # where each landed kill stopped the run: the next stage then
    missed: int = 0  # kills drawn too late: the run had ended by itself
    differences: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.differences


def start(recipe: Path, run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "selfie.cli.main", "run", str(recipe), "--output_dir", str(run_dir)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until_started(proc: subprocess.Popen, run_dir: Path) -> bool:
    """Until the process holds the run directory (its pid in RUN/.lock: checks passed); False if it ended first."""
    lock = run_dir / ".lock"
    while proc.poll() is None:
        try:
            if lock.read_text().strip() == str(proc.pid):
                return True
        except OSError:
            pass
        time.sleep(0.005)
    return False


def finished(proc: subprocess.Popen) -> None:
    err = proc.stderr.read()
    if proc.wait() != 0:
        raise RuntimeError(f"selfie run failed ({proc.returncode}): {err[-3000:]}")


def uninterrupted(recipe: Path, run_dir: Path) -> float:
    """Run to the end; returns the seconds from taking the run directory to the end (the window kills fall in)."""
    proc = start(recipe, run_dir)
    if not wait_until_started(proc, run_dir):
        finished(proc)
    began = time.perf_counter()
    finished(proc)
    return time.perf_counter() - began


def next_stage(ctx: RunContext) -> str:
    following = ctx.manifest().next_stage(ctx.plan)
    return "after the last stage" if following is None else f"iteration {following[0]} {following[1]}"


def trial(recipe: Path, reference: Path, run_dir: Path, window: float, rng: random.Random, max_kills: int) -> tuple[Trial, float]:
    """Kill, rerun, kill... (at most `max_kills` landed kills), then let the rerun finish; compare with `reference`.
    Each kill falls uniformly in what is left of `window`, the run's expected time (at least a tenth of it).
    Returns the trial and this trial's estimate of the run's time (killed time + the last run's): the machine's
    load changes, and a window too long makes kills come after the run has ended."""
    ctx = RunContext.for_recipe(load_recipe(recipe, ["--output_dir", str(run_dir)]))
    result, progress = Trial(), 0.0
    while True:
        proc = start(recipe, run_dir)
        started = wait_until_started(proc, run_dir)
        began = time.perf_counter()
        if started and len(result.kills) < max_kills:
            delay = rng.uniform(0, max(window - progress, window / 10))
            while proc.poll() is None and time.perf_counter() < began + delay:
                time.sleep(0.002)
            if proc.poll() is None:
                proc.send_signal(signal.SIGSTOP)  # frozen: what is on disk now is what the kill leaves
                where = next_stage(ctx)
                proc.send_signal(signal.SIGKILL)
                if proc.wait() == -signal.SIGKILL:
                    result.kills.append(where)
                    progress += delay
                    continue
                # not killed: it exited between the poll and the stop; finished() says whether that was success
            result.missed += 1  # it ended before its kill came: that run was the resume
        finished(proc)
        break
    result.differences = compare(reference, run_dir, load_recipe(recipe).num_iterations)
    return result, progress + time.perf_counter() - began


def compare(reference: Path, run_dir: Path, iterations: int) -> list[str]:
    """What differs from the uninterrupted run: row files byte for byte, adapters weight for weight, leftovers."""
    ref, run = RunContext.load(reference), RunContext.load(run_dir)
    row_files = [(0, RunContext.pairs)] + [(t, f) for t in range(1, iterations + 1) for f in ROW_FILES]
    differences = [run.relative(f(run, t)) for t, f in row_files if not filecmp.cmp(f(ref, t), f(run, t), shallow=False)]
    for t in range(iterations + 1):
        a, b = (load_file(ctx.adapter(t) / "adapter_model.safetensors") for ctx in (ref, run))
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            differences.append(run.relative(run.adapter(t)))
    leftovers = [
        p
        for p in run_dir.rglob("*")
        if "wandb" not in p.relative_to(run_dir).parts
        and (p.name.endswith((".tmp", ".partial")) or p.name in ("checkpoints", ".lock"))
    ]
    differences += [f"left behind: {p.relative_to(run_dir)}" for p in leftovers]
    return differences


def torture(directory: Path, trials: int, seed: int, max_kills: int = 4, min_kills: int = 0) -> tuple[list[Trial], float]:
    """`trials` trials, more while fewer than `min_kills` kills have landed; returns them and the window used."""
    recipe = write_recipe(directory, str(build_tiny_model(directory / "model")), *write_inputs(directory))
    window = uninterrupted(recipe, directory / "reference")
    rng, results = random.Random(seed), []
    while len(results) < trials or sum(len(r.kills) for r in results) < min_kills:
        result, estimate = trial(recipe, directory / "reference", directory / f"trial{len(results):03d}", window, rng, max_kills)
        results.append(result)
        window = (window + estimate) / 2  # follow the machine's load
    return results, window


# ---- docs/RELIABILITY.md --------------------------------------------------------------------------


def bad_input_lines(directory: Path) -> list[tuple[str, str, str]]:
    """(case, overrides, the line `selfie run` printed) for each case of tests/test_preflight.py."""
    inputs = make_inputs(directory, str(build_tiny_model(directory / "model")))
    sys.path.insert(0, str(directory))  # the cases' callable judge module, as the test's monkeypatch.syspath_prepend
    lines = []
    for case, (overrides, _) in CASES.items():
        argv = [with_paths(o, inputs) for o in overrides]
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = selfie_main(["run", str(inputs["recipe"]), "--output_dir", str(directory / "run"), *argv])
        line = err.getvalue().strip().splitlines()[-1].replace(str(directory), "DIR")
        shown = " ".join(o.replace(str(directory), "DIR") if o else "''" for o in argv)
        lines.append((case, shown, f"{line} (exit {code})"))
    return lines


def replace_between(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    return re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{body}\n{end}", text, flags=re.S)


def torture_table(results: list[Trial], window: float, seed: int, seconds: float) -> str:
    kills = [where for r in results for where in r.kills]
    by_stage = Counter(kills)
    lines = [
        f"Measured by `PYTHONPATH=tests python -m scripts.dev.torture --trials {len(results)} --seed {seed}` "
        f"({time.strftime('%Y-%m-%d')}, {seconds / 60:.1f} min; a run took about {window:.1f} s from taking its run "
        "directory to the end; up to 4 kills a trial):",
        "",
        "| trials | kills that landed | kills drawn after the run had ended | identical resumes |",
        "|---|---|---|---|",
        f"| {len(results)} | {len(kills)} | {sum(r.missed for r in results)} | "
        f"{sum(r.identical for r in results)} of {len(results)} |",
        "",
        "Where the kills landed (the stage the manifest had next):",
        "",
        "| next stage | kills |",
        "|---|---|",
    ]
    lines += [f"| {where} | {count} |" for where, count in sorted(by_stage.items())]
    failed = [f"trial {i}: {', '.join(r.differences)}" for i, r in enumerate(results) if r.differences]
    if failed:
        lines += ["", "Differences:", *[f"- {line}" for line in failed]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", type=Path, default=None, help="update this RELIABILITY.md's measured sections")
    parser.add_argument("--bad-inputs-only", action="store_true", help="only the bad-input table, no kills")
    args = parser.parse_args()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="selfie-torture-") as tmp:
        table = None
        if not args.bad_inputs_only:
            results, window = torture(Path(tmp), args.trials, args.seed)
            table = torture_table(results, window, args.seed, time.perf_counter() - began)
            print(table)
        (Path(tmp) / "cases").mkdir()
        cases = bad_input_lines(Path(tmp) / "cases")
    if args.write:
        rows = ["| case | overrides | what `selfie run` prints |", "|---|---|---|"]
        rows += [f"| {case} | `{argv}` | `{line}` |" for case, argv, line in cases]
        text = args.write.read_text() if table is None else replace_between(args.write.read_text(), "torture", table)
        args.write.write_text(replace_between(text, "bad-inputs", "\n".join(rows)))


if __name__ == "__main__":
    main()
