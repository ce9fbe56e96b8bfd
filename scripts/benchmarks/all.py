"""Every benchmark, one after the other (`make bench`), then the end-to-end time of the demo recipe.

Each benchmark script runs in its own process and writes its own section of docs/BENCHMARKS.md and
docs/bench/*.json; a failing one is reported and the rest still run. The end-to-end section reads
the stage times (RUN/iter_t/metrics.json "times") of a complete demo run in --run-dir (default: the
demo recipe's output_dir); without one it runs the demo recipe into a temporary directory and times
the whole command, so the loop's own overhead (start-up, imports, model loads between stages,
tracking) shows against the sum of the stage times.

    python -m scripts.benchmarks.all [--quick] [--only load,judge,generate,train,edit,e2e] [--run-dir RUN]

--quick runs every benchmark at smoke-test sizes and writes to a scratch copy of the docs
(benchlib.QUICK_DOCS), never over the measurements in docs/.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.benchlib import ROOT, machine, save_raw, use_quick_docs, write_section

RECIPE = "recipes/smollm2-135m/spa/demo.yaml"
# name (the module scripts.benchmarks.<name>) -> arguments of a --quick run; the full runs use each one's defaults
BENCHMARKS = {
    "load": ["--repeats", "1"],
    "judge": ["--quick"],
    "generate": ["--quick"],
    "train": ["--quick"],
    "edit": ["--quick"],
}
# The demo recipe at smoke-test sizes: one iteration of 2 prompts, 8-token responses, one optimizer step per stage
QUICK_DEMO = [
    "--num_iterations",
    "1",
    "--data.iteration_sizes",
    "[2]",
    "--generate.max_new_tokens",
    "8",
    "--judge.truncated",
    "keep",
    "--train.seed_epochs",
    "0.1",
    "--train.max_length",
    "64",
    "--report_to",
    "[]",
]


def run_benchmark(name: str, args: list[str]) -> tuple[bool, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", f"scripts.benchmarks.{name}", *args], cwd=ROOT)
    return done.returncode == 0, time.perf_counter() - start


# ---- end to end -------------------------------------------------------------------------------------


def is_complete(run_dir: Path) -> bool:
    from selfie.run.rundir import RunContext

    if not (run_dir / "config.yaml").is_file():
        return False
    ctx = RunContext.load(run_dir)
    return ctx.manifest().next_stage(ctx.plan) is None


def recorded(run_dir: Path, key: str) -> dict[int, dict]:
    """{iteration: {stage: value}} of what the loop records under `key` in each iteration's metrics.json."""
    from selfie.run.rundir import RunContext

    ctx = RunContext.load(run_dir)
    return {t: ctx.read_metrics(t).get(key, {}) for t in range(ctx.config.num_iterations + 1) if ctx.metrics(t).exists()}


def stage_times(run_dir: Path) -> dict[int, dict[str, float]]:
    """{iteration: {stage: seconds}}."""
    return recorded(run_dir, "times")


def table(values: dict[int, dict[str, float]], total: bool) -> str:
    """A markdown table, a row per iteration and a column per stage (plus their sum)."""
    stages = list(dict.fromkeys(stage for t in values.values() for stage in t))
    head = f"| iteration | {' | '.join(stages)} |{' total |' if total else ''}\n|---|{'---|' * (len(stages) + total)}"
    rows = [
        f"| {t} | "
        + " | ".join(f"{values[t][s]:.1f}" if s in values[t] else "" for s in stages)
        + (f" | {sum(values[t].values()):.1f} |" if total else " |")
        for t in sorted(values)
    ]
    return "\n".join([head, *rows])


def loop_span(run_dir: Path, stage_sum: float) -> float | None:
    """Seconds from the loop writing config.yaml to its last write (summary.md), or None when the run was resumed
    or re-opened (config.yaml rewritten later: the span is then shorter than its stages)."""
    from selfie.run.rundir import RunContext

    ctx = RunContext.load(run_dir)
    span = ctx.summary_file.stat().st_mtime - ctx.config_file.stat().st_mtime
    return span if span >= stage_sum - 1.0 else None  # 1 s: the loop rounds each stage's time


def run_demo(run_dir: Path, quick: bool) -> float:
    """Run the demo recipe into run_dir; the command's wall seconds, process start-up and imports included."""
    command = [
        sys.executable,
        "-m",
        "selfie.cli.main",
        "run",
        RECIPE,
        "--output_dir",
        str(run_dir),
        *(QUICK_DEMO if quick else []),
    ]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.perf_counter() - start


def end_to_end(run_dir: Path, quick: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="selfie-bench-demo-") as tmp:
        if not quick and is_complete(run_dir):
            source = f"the complete run in `{run_dir.relative_to(ROOT) if run_dir.is_relative_to(ROOT) else run_dir}`"
            times = stage_times(run_dir)
            wall = loop_span(run_dir, sum(sum(t.values()) for t in times.values()))
            measured = "config.yaml to summary.md, by their file times: start-up and imports not included"
        else:
            source = "a fresh run of the recipe into a temporary directory" + (" (--quick sizes)" if quick else "")
            run_dir = Path(tmp) / "run"
            wall = run_demo(run_dir, quick)
            times = stage_times(run_dir)
            measured = "the whole `selfie run` command, process start-up and imports included"
        memory = recorded(run_dir, "memory")
    peaks = {t: {stage: m["peak_rss_mib"] for stage, m in stages.items() if "peak_rss_mib" in m} for t, stages in memory.items()}
    stage_sum = sum(sum(t.values()) for t in times.values())
    save_raw(
        "e2e",
        {
            "machine": machine(),
            "source": source,
            "quick": quick,
            "stage_times": times,
            "stage_sum_seconds": stage_sum,
            "end_to_end_seconds": wall,
            "stage_peak_rss_mib": peaks,
        },
    )
    if wall is None:
        verdict = (
            f"End to end: not measurable from this run directory (it was resumed or re-opened after it finished); "
            f"the stages sum to {stage_sum:.0f} s."
        )
    else:
        verdict = (
            f"End to end ({measured}): **{wall:.0f} s**, **{wall / stage_sum:.2f}x** the {stage_sum:.0f} s the stages "
            f"take together: the loop's own overhead is {wall - stage_sum:.0f} s."
        )
    iterations = [sum(times[t].values()) for t in sorted(times) if t > 0]
    per_iteration = f" An iteration takes {sum(iterations) / len(iterations):.0f} s on average." if iterations else ""
    write_section(
        "End to end",
        f"""
`python -m scripts.benchmarks.all{" --quick" if quick else ""}` ({machine()}). The demo recipe `{RECIPE}` (seed stage +
iterations of generate, judge, train), from {source}. Seconds per stage as the loop records them (RUN/iter_t/metrics.json
"times"; iteration 0 is the seed stage).

{table(times, total=True)}

{verdict}{per_iteration}

Peak resident set of each stage, MiB (RUN/iter_t/metrics.json "memory": the process's high-water mark, reset as
the stage starts). The driver frees what a stage loaded before the next one starts (no model outlives its stage:
tests/stage_leaks.py), but the C allocator keeps some freed heap pages mapped, so a stage after a training stage
starts from a higher resident set than the first of its kind:

{table(peaks, total=False) if any(peaks.values()) else "(not recorded: a run directory written before selfie recorded it)"}
""",
    )
    print(verdict)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes, written to a scratch copy of docs/")
    parser.add_argument("--only", default=",".join([*BENCHMARKS, "e2e"]), help="comma-separated benchmarks to run")
    parser.add_argument("--run-dir", default=None, help="a complete demo run to read (default: the demo recipe's output_dir)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    chosen = args.only.split(",")
    unknown = sorted(set(chosen) - {*BENCHMARKS, "e2e"})
    if unknown:
        parser.error(f"--only: unknown benchmark {unknown[0]} (known: {', '.join([*BENCHMARKS, 'e2e'])})")
    if args.quick:
        logging.info("--quick: writing to %s", use_quick_docs())

    failed, seconds = [], {}
    for name in (n for n in BENCHMARKS if n in chosen):
        logging.info("benchmark %s", name)
        ok, seconds[name] = run_benchmark(name, BENCHMARKS[name] if args.quick else [])
        if not ok:
            failed.append(name)
    if "e2e" in chosen:
        from selfie.config.loader import load_recipe

        start = time.perf_counter()
        try:
            end_to_end(ROOT / (args.run_dir or load_recipe(ROOT / RECIPE).output_dir), args.quick)
        except Exception:
            logging.exception("benchmark e2e failed")
            failed.append("e2e")
        seconds["e2e"] = time.perf_counter() - start
    logging.info(
        "wall seconds per benchmark: %s; written to %s",
        {k: round(v) for k, v in seconds.items()},
        os.environ.get("SELFIE_BENCH_DOCS", "docs/"),
    )
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
