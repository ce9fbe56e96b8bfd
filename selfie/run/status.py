"""`selfie status RUN`: where a run stands."""

from __future__ import annotations

from pathlib import Path

from selfie.errors import SelfieError
from selfie.io import count_lines
from selfie.labelling.signal import signal_line
from selfie.run.plan import BY_NAME, SEED
from selfie.run.rundir import RunContext, artifact_problem


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
        signal = ctx.read_metrics(0).get(SEED.name, {}).get("label_signal") if entry["stage"] == SEED.name else None
        if signal:
            lines.append(f"        {signal_line(signal)}")
    following = manifest.next_stage(steps)
    if following is None:
        lines.append("  complete")
    else:
        partial = ctx.partial_outputs()
        resumes = "resumes inside" if BY_NAME[following[1]].resumes_inside else "starts over if it was interrupted"
        lines.append(
            f"  next  iter {following[0]:>2}  {following[1]}  ({resumes})"
            + (f"  (in progress: {', '.join(partial)})" if partial else "")
        )
    return "\n".join(lines)
