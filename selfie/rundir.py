"""The run directory contract: resolved config, manifest of completed stages, and the one-run lock.

RUN/config.yaml holds the fully resolved recipe, RUN/manifest.json the stages completed so far
(rewritten atomically after each one). A stage counts as done only once it is in the manifest.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from selfie.config import RecipeConfig, _build, config_hash, differing_keys, dump_recipe, earlier_config_hash, upgrade_run_values
from selfie.errors import SelfieError
from selfie.io import atomic_write_json, atomic_write_text, read_json

STAGES = ("init", "seed", "generate", "judge", "train", "eval")


def iteration_dir(run_dir: Path, iteration: int) -> Path:
    return run_dir / f"iter_{iteration:03d}"


@dataclass
class Manifest:
    path: Path
    config_hash: str
    stages: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path, config_hash: str) -> Manifest:
        if not path.exists():
            return cls(path, config_hash)
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or "config_hash" not in data:
            raise SelfieError(f"{path}: corrupt manifest (needs 'config_hash' and a 'stages' list)")
        for i, stage in enumerate(data["stages"]):
            if not isinstance(stage, dict) or {"iteration", "stage", "status"} - set(stage) or stage["stage"] not in STAGES:
                raise SelfieError(f"{path}: corrupt manifest entry stages[{i}]: {stage!r}")
        return cls(path, data["config_hash"], data["stages"])

    def is_done(self, iteration: int, stage: str) -> bool:
        return any(s["iteration"] == iteration and s["stage"] == stage and s["status"] == "done" for s in self.stages)

    def record(self, iteration: int, stage: str, artifacts: list[str]) -> None:
        self.stages.append({"iteration": iteration, "stage": stage, "status": "done", "artifacts": artifacts})
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, {"config_hash": self.config_hash, "stages": self.stages})

    def next_stage(self, plan: list[tuple[int, str]]) -> tuple[int, str] | None:
        return next((step for step in plan if not self.is_done(*step)), None)


class RunLock:
    """An flock on RUN/.lock: a second process is refused; the kernel drops the lock of a killed one."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise SelfieError(f"{self.path.parent}: run directory is in use by pid {holder}; wait for it or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def read_run_config(run_dir: Path) -> tuple[RecipeConfig, dict, list[str]]:
    """The run's config (in this version's form), its config.yaml as written, and what this version would not
    reproduce of a run an earlier version wrote (see selfie/config.py::upgrade_run_values)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise SelfieError(f"{run_dir}: not a run directory (no config.yaml)")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
        upgraded, not_reproduced = upgrade_run_values(values)
        return _build(RecipeConfig, upgraded), values, not_reproduced
    except (yaml.YAMLError, TypeError, AttributeError, SelfieError) as e:
        raise SelfieError(f"{path}: unreadable run config ({str(e).splitlines()[0]})") from None


def load_run_config(run_dir: Path) -> RecipeConfig:
    return read_run_config(run_dir)[0]


def check_and_write_config(run_dir: Path, config: RecipeConfig, force: bool) -> None:
    """Refuse to continue a run with results-changing differences unless forced; then (re)write config.yaml."""
    if (run_dir / "config.yaml").exists():
        previous, written, not_reproduced = read_run_config(run_dir)
        changed = differing_keys(previous, config) + not_reproduced
        if changed and not force:
            raise SelfieError(
                f"{run_dir}: recipe differs from the run's own config.yaml in {', '.join(changed)}; "
                "use the same recipe, a new output_dir, or --force"
            )
        if not not_reproduced:
            _adopt_earlier_manifest(run_dir, written, previous)
    atomic_write_text(run_dir / "config.yaml", dump_recipe(config))


def _adopt_earlier_manifest(run_dir: Path, written: dict, previous: RecipeConfig) -> None:
    """A manifest that an earlier version wrote for this config.yaml carries that version's hash of it: give it this
    version's, so the run resumes. Any other mismatch is left for `open_manifest` to refuse."""
    path = run_dir / "manifest.json"
    if not path.exists():
        return
    manifest = Manifest.load(path, config_hash(previous))
    if manifest.config_hash != config_hash(previous) and manifest.config_hash == earlier_config_hash(written):
        manifest.config_hash = config_hash(previous)
        manifest.save()


def open_manifest(run_dir: Path, config: RecipeConfig, force: bool) -> Manifest:
    current = config_hash(config)
    manifest = Manifest.load(run_dir / "manifest.json", current)
    if manifest.config_hash != current and not force:
        raise SelfieError(f"{manifest.path}: made by a different recipe (config_hash {manifest.config_hash} != {current}); use --force")
    manifest.config_hash = current
    return manifest
