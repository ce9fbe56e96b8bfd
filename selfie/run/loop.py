"""The SPA loop (docs/METHOD.md section 1): seed DPO, then generate -> judge -> train (-> eval) per iteration.

The driver runs the run's plan (selfie/run/plan.py) stage by stage (selfie/run/stages.py); the
manifest records a stage once its artifacts are complete, so re-running the same command resumes after the
last completed stage (and inside generation / training from their own resume points). Under
`accelerate launch` every rank runs this driver; rank 0 alone writes metrics and the manifest.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from selfie import memory
from selfie.config.schema import RecipeConfig, to_dict
from selfie.data import Splits
from selfie.dist import Ranks, check_topology, process_state
from selfie.errors import SelfieError, out_of_space
from selfie.io import atomic_write_json
from selfie.run.context import StageContext
from selfie.run.guard import stopped_line
from selfie.run.lock import RunLock
from selfie.run.plan import BY_NAME, VALIDATE
from selfie.run.preflight import preflight
from selfie.run.rundir import Manifest, open_run
from selfie.run.stages import run_stage
from selfie.run.tracking import Tracker, write_summary

logger = logging.getLogger(__name__)


def run_loop(config: RecipeConfig, force: bool = False) -> str:
    """Run (or resume) the whole recipe; returns the summary table (markdown) on rank 0."""
    check_topology()
    ranks = launched_ranks(config)
    ctx = StageContext(config, Path(config.output_dir), ranks)
    lock = RunLock(ctx.run_dir)
    ctx.splits = ranks.on_main(lambda: take_over(ctx, lock, force))
    manifest = ctx.manifest()  # as rank 0 left it
    tracker = Tracker(ctx.run_dir, config.run_name or ctx.run_dir.name, config.report_to, to_dict(config), ranks.is_main)
    where, current = "the summary", None
    try:
        for t, stage in ctx.plan:
            if manifest.stopped:
                break
            if manifest.is_done(t, stage):
                continue
            if t != current:  # one wandb run per iteration
                tracker.finish()
                tracker.start(t)
                current = t
            logger.info("iteration %d: %s", t, stage)
            where = f"iteration {t}'s {stage} stage"
            start = time.perf_counter()
            memory.reset_peaks()
            metrics = run_stage(ctx, t, stage)
            memory.release()  # before the next stage loads its own models
            record(ctx, manifest, tracker, t, stage, metrics, time.perf_counter() - start)
            if stage == VALIDATE.name and metrics.get("stop"):  # the stop rule's verdict, the same on every rank
                stop(ctx, manifest, t, "; ".join(metrics["failed"]))
        if manifest.stopped:  # now, or by an earlier run: either way the run ends here
            logger.warning("%s", stopped_line(manifest.stopped))
        tracker.finish()
        return write_summary(ctx) if ranks.is_main else ""
    except BaseException as e:
        tracker.finish(failed=True)  # now, so that wandb's closing lines come before the error line
        # any library's error (safetensors' SafetensorError is neither OSError nor RuntimeError), not selfie's own line
        if isinstance(e, Exception) and not isinstance(e, SelfieError) and out_of_space(e, ctx.run_dir):
            raise SelfieError(
                f"{ctx.run_dir}: no space left on device during {where}; free some space and run "
                "the same command again: it resumes from the last completed step"
            ) from e
        raise
    finally:
        lock.release()


def launched_ranks(config: RecipeConfig) -> Ranks:
    """The ranks `accelerate launch` started; their collectives wait train.ddp_timeout seconds (TrainingArguments'
    key, default 1800) for a slow rank, e.g. while rank 0 alone writes or evaluates."""
    return Ranks(process_state(config.train.trainer_args.get("ddp_timeout", 1800)))


def take_over(ctx: StageContext, lock: RunLock, force: bool) -> Splits | None:
    """Rank 0: check everything the remaining stages need before writing anything, then take the directory over.
    Returns the prompt slices the preflight loaded."""
    splits = preflight(ctx.config, ctx.manifest().done_steps()).splits
    lock.acquire()
    try:
        open_run(ctx, force)
    except BaseException:
        lock.release()
        raise
    return splits


def stop(ctx: StageContext, manifest: Manifest, t: int, reason: str) -> None:
    """The stop rule ends the loop after iteration t: recorded in the manifest (rank 0), known to every rank."""
    if ctx.ranks.is_main:
        manifest.stop(t, reason)
    else:
        manifest.stopped = {"iteration": t, "reason": reason}


def record(ctx: StageContext, manifest: Manifest, tracker: Tracker, t: int, stage: str, metrics: dict, seconds: float) -> None:
    """The stage is done: its metrics and time into iter_t's metrics.json and wandb, its artifacts into the manifest."""
    if ctx.ranks.is_main:
        merged = ctx.read_metrics(t)
        merged[stage] = metrics
        merged.setdefault("times", {})[stage] = round(seconds, 2)
        peaks = merged.setdefault("memory", {})[stage] = memory.peaks()  # rank 0's
        atomic_write_json(ctx.metrics(t), merged)
        tracker.log({stage: metrics, "time": {stage: seconds}, "memory": {stage: peaks}})
        manifest.record(t, stage, [ctx.relative(path) for path in ctx.artifacts(t, stage)])
        if BY_NAME[stage].trains:
            ctx.drop_checkpoints(manifest)
    else:  # what the other ranks know of the manifest
        manifest.stages.append({"iteration": t, "stage": stage, "status": "done"})
    ctx.ranks.barrier()
