"""`selfie status RUN`: where a run stands."""

from __future__ import annotations

from pathlib import Path

from selfie.config.schema import RecipeConfig
from selfie.errors import SelfieError
from selfie.io import count_lines
from selfie.labelling.signal import signal_line
from selfie.run.guard import stopped_line
from selfie.run.plan import BY_NAME, SEED, VALIDATE
from selfie.run.rundir import RunContext, artifact_problem
from selfie.run.validation import recorded_best, validation_line

DEFAULT_ROOT = Path(RecipeConfig.output_dir).parent  # where recipes put their runs unless told otherwise


def runs_overview(root: Path) -> str:
    """One line per run directory under `root` (its stages done and what comes next), or what to pass instead."""
    runs = sorted(path.parent for path in root.glob("*/manifest.json"))
    if not runs:
        raise SelfieError(
            f"no run directory given, and none under {root}/; pass one: selfie status RUN_DIR (a recipe's output_dir)"
        )
    return "\n".join(status_text(run).splitlines()[0].removeprefix("run ") for run in runs)


def status_text(run_dir: str | Path) -> str:
    """What `selfie status` prints: the stages the manifest records (with their artifacts' rows and state), then
    the next stage and its resume points."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SelfieError(f"{run_dir}: run directory not found")
    ctx = RunContext.load(run_dir)
    manifest, steps = ctx.manifest(), ctx.plan
    done = [step for step in steps if manifest.is_done(*step)]
    lines = [f"run {run_dir}  ({len(done)}/{len(steps)} stages done, {ctx.config.num_iterations} iterations planned)"]
    for entry in manifest.stages:
        artifacts = []
        for rel in entry.get("artifacts", []):
            path = run_dir / rel
            rows = f" ({count_lines(path)} rows)" if path.suffix == ".jsonl" and path.is_file() else ""
            problem = artifact_problem(path, entry.get("checksums", {}).get(rel))  # the resume would stop on it
            artifacts.append(rel + rows + (f" ({problem.split(' (')[0]})" if problem else ""))
        lines.append(f"  done  iter {entry['iteration']:>2}  {entry['stage']:<8}  {', '.join(artifacts)}")
        stage_metrics = ctx.read_metrics(entry["iteration"]).get(entry["stage"], {})
        if entry["stage"] == SEED.name and stage_metrics.get("label_signal"):
            lines.append(f"        {signal_line(stage_metrics['label_signal'])}")
        if entry["stage"] == VALIDATE.name and stage_metrics:
            lines.append(f"        {validation_line(stage_metrics)}")
    best = recorded_best(ctx)
    if best is not None:
        lines.append(f"  best  iter {best:>2}  (validation; selfie export takes it)")
    following = manifest.next_stage(steps)
    if manifest.stopped:
        lines.append(f"  {stopped_line(manifest.stopped)}")
    elif following is None:
        lines.append("  complete")
    else:
        partial = ctx.partial_outputs()
        resumes = "resumes inside" if BY_NAME[following[1]].resumes_inside else "starts over if it was interrupted"
        lines.append(
            f"  next  iter {following[0]:>2}  {following[1]}  ({resumes})"
            + (f"  (in progress: {', '.join(partial)})" if partial else "")
        )
    return "\n".join(lines)
