"""`selfie status RUN`: where a run stands."""

from __future__ import annotations

from pathlib import Path

from selfie.config import config_hash
from selfie.errors import SelfieError
from selfie.io import count_lines
from selfie.rundir import Manifest, artifact_problem, load_run_config, plan


def describe(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SelfieError(f"{run_dir}: run directory not found")
    config = load_run_config(run_dir)
    manifest = Manifest.load(run_dir / "manifest.json", config_hash(config))
    steps = plan(config)
    done = [step for step in steps if manifest.is_done(*step)]
    lines = [f"run {run_dir}  ({len(done)}/{len(steps)} stages done, {config.num_iterations} iterations planned)"]
    for entry in manifest.stages:
        artifacts = []
        for rel in entry.get("artifacts", []):
            path = run_dir / rel
            rows = f" ({count_lines(path)} rows)" if path.suffix == ".jsonl" and path.is_file() else ""
            problem = artifact_problem(path, entry.get("checksums", {}).get(rel))  # the resume would stop on it
            artifacts.append(rel + rows + (f" ({problem.split(' (')[0]})" if problem else ""))
        lines.append(f"  done  iter {entry['iteration']:>2}  {entry['stage']:<8}  {', '.join(artifacts)}")
    following = manifest.next_stage(steps)
    if following is None:
        lines.append("  complete")
    else:
        partial = sorted(str(p.relative_to(run_dir)) for p in run_dir.glob("iter_*/*.partial"))
        lines.append(f"  next  iter {following[0]:>2}  {following[1]}" + (f"  (in progress: {', '.join(partial)})" if partial else ""))
    return "\n".join(lines)
