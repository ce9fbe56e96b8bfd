"""The trainer, judge, recipe and loop tests against other versions of selfie's dependencies (`make test-compat`):
the oldest the ranges in pyproject.toml claim and the newest on the registry, each installed in a virtual
environment of its own; the results go to docs/COMPAT.md.

    python -m scripts.dev.compat [--sets oldest,newest] [--render]

A set's environment lives in selfie's cache (compat-<set>) and is reused when its versions have not changed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from selfie.models import cache_dir

from scripts.benchlib import ROOT, machine

# the ends of the ranges in pyproject.toml; torch stays the CPU build every set is installed with
SETS = {
    "oldest": {"transformers": "5.20.0", "trl": "1.16.0", "peft": "0.20.0", "accelerate": "1.13.0", "datasets": "5.0.0"},
    "newest": {"transformers": "5.25.0", "trl": "1.16.0", "peft": "0.21.2", "accelerate": "1.16.0", "datasets": "5.2.0"},
}
TESTS = [
    "tests/test_trainer.py",
    "tests/test_judge.py",
    "tests/test_trl_keys.py",
    "tests/test_loop.py",
    "tests/test_config.py",
    "-m",
    "not slow",
]
RESULTS = ROOT / "docs" / "bench" / "compat.json"
PAGE = ROOT / "docs" / "COMPAT.md"


def environment(name: str, pins: dict[str, str]) -> Path:
    """The set's virtual environment with selfie installed from this checkout against `pins`."""
    venv = cache_dir() / f"compat-{name}"
    stamp = venv / "pins.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == pins:
        return venv
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU build first: an unpinned torch pulls CUDA
    subprocess.run([*pip, "-e", f"{ROOT}[dev]", *(f"{package}=={version}" for package, version in pins.items())], check=True)
    stamp.write_text(json.dumps(pins))
    return venv


def run_set(name: str, pins: dict[str, str]) -> dict:
    venv = environment(name, pins)
    python = str(venv / "bin" / "python")
    installed = subprocess.run(
        [python, "-c", "import importlib.metadata as m, json, sys; print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))",
         *pins, "torch", "deepspeed"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=ROOT, capture_output=True, text=True
    )
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr.strip()[-300:]
    failures = re.findall(r"^FAILED (\S+)", done.stdout, flags=re.MULTILINE)
    return {
        "versions": json.loads(installed.stdout),
        "passed": done.returncode == 0,
        "summary": summary,
        "failed": failures,
        "minutes": round((time.perf_counter() - start) / 60, 1),
    }


def render(results: dict) -> str:
    rows = "\n".join(
        f"| {name} | {', '.join(f'{p} {v}' for p, v in r['versions'].items())} | "
        f"{'passed' if r['passed'] else 'FAILED'}: {r['summary']} | {r['minutes']} |"
        for name, r in results["sets"].items()
    )
    failures = "\n".join(f"- {name}: `{test}`" for name, r in results["sets"].items() for test in r["failed"])
    return f"""# Compatibility

Which versions of selfie's dependencies its tests pass with: the ends of the ranges in `pyproject.toml` (the oldest
each range claims, and the newest on the registry), each installed in a virtual environment of its own by
`make test-compat` (`python -m scripts.dev.compat`), which runs the trainer, judge, recipe and loop tests there
(`{" ".join(TESTS)}`). CI runs the whole suite with the versions `make install` picks.

## Contents

- [Results](#results)
- [What selfie relies on](#what-selfie-relies-on)

## Results

{results["machine"]}, {results["date"]}.

| set | versions | tests | minutes |
|---|---|---|---|
{rows}

{("Failures:" + chr(10) + failures) if failures else "Every test passed on both ends."}

## What selfie relies on

- TRL's private methods that `NoiseAwareDPOTrainer` overrides or calls, and the fused LM head's `log_probs` it
  records, are listed in `selfie/training/trainer.py::TRL_INTERNALS`; tests/test_trainer.py checks each against the
  installed TRL and names the one that changed. TRL 1.14 and older have no fused LM head returning `log_probs`
  (the trainer's margins read them). TRL 1.15.0 has it, but fails here: the oldest set with trl 1.15.0 gave 11
  failed tests and 12 errors (2026-12-07); the trainer tests stop at `'NoneType' object has no attribute 'apply'`
  in `trl/trainer/utils.py`, because its fused LM head runs a Triton kernel (`trl.kernels.ChunkedLogProbFunction`)
  that a CPU build of torch does not have, where 1.16 falls back to plain torch; with trl 1.16.0 the same set passes.
  On a GPU with Triton 1.15 may pass; it has not been tried, so the range starts at 1.16 and holds one minor version
  of TRL (transformers' range holds six: 5.20 to 5.25).
- The process-wide DeepSpeed config transformers' TrainingArguments sets, and what ZeRO-3 keeps of a finished
  engine (selfie/dist.py::trainer_scope), are read by name: a DeepSpeed or transformers upgrade that renames them
  shows in tests/test_launches.py.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated sets to run")
    parser.add_argument("--render", action="store_true", help="only write the page from the saved results")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"sets": {}}
    if not args.render:
        for name in args.sets.split(","):
            print(f"compat: {name} {SETS[name]}", flush=True)
            results["sets"][name] = run_set(name, SETS[name])
            print(f"compat: {name}: {results['sets'][name]['summary']}", flush=True)
        results.update(machine=machine(), date=date.today().isoformat())
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    PAGE.write_text(render(results))
    if not all(r["passed"] for r in results["sets"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
