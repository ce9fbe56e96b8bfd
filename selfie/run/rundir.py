"""The run directory contract: resolved config, manifest of completed stages, and tidying after killed runs.

RUN/config.yaml holds the fully resolved recipe, RUN/manifest.json the stages completed so far, what each
one's artifacts were when it completed (rows and SHA-256), the recipe hash they were made with, every
`--force` change of recipe and the schema_version of the layout (a run directory of an earlier layout is
upgraded to this one: selfie/config/compat.py). The manifest is rewritten atomically and is the authority:
config.yaml is its readable copy. A stage counts as done only once it is in the manifest, and a resume first
checks that its artifacts are still what was recorded. The one-run lock is selfie/run/lock.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from selfie.config.compat import SCHEMA_VERSION, RunState, changed_values, config_hash, made_with, upgrade_run
from selfie.config.loader import build_recipe, dump_recipe
from selfie.config.schema import RecipeConfig
from selfie.errors import SelfieError
from selfie.io import TMP_SUFFIX, atomic_write_text, count_lines, file_sha256, read_json
from selfie.run.plan import BY_NAME, adapter_stage, plan

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin")  # what a directory artifact's checksum covers
ADAPTER, CHECKPOINTS = "adapter", "checkpoints"  # what a training stage writes in its directory (stages.py passes them)


@dataclass
class RunContext:
    """One run: its recipe, where each of its files lives and which stages it runs. The run directory's layout is
    written here and nowhere else (docs/DESIGN.md section 2):

        RUN/config.yaml, manifest.json, summary.md, summary.png, wandb/
        RUN/init/model      the representation-edited pi_init (a recipe with `init:`)
        RUN/iter_TTT/       responses.jsonl, judgments.jsonl, pairs.jsonl, adapter/, checkpoints/, metrics.json,
                            eval.json, eval/ (iteration 0 is the seed stage)
        RUN/iter_000/signal/fold_F.jsonl   the label-signal check's judgments of fold F's held-out seed pairs
        RUN/iter_000/reward_head/          the bradley-terry labeller's head (judge.labeller: bradley-terry)
        RUN/iter_000/ensemble/member_M/    the ensemble labeller's seed adapters; iter_TTT/ensemble/member_M.jsonl
                                           each member's judgments of iteration t (ensemble, consistency)
        RUN/iter_000/fold_adapters/        the check's fold adapters, kept for judge.labeller: consistency
        RUN/iter_000/seed_candidates/      each train.seed_candidates candidate's check
        RUN/iter_TTT/anchor_responses.jsonl, policy_responses.jsonl   judge.anchored's samples of pi_init, pi_{t-1}
        RUN/iter_000/validation_pairs.jsonl, iter_TTT/validation/   the held-out seed pairs; the validate stage's
                                           samples and judgments (`validation:`)

    `run_dir` is where the run is now: a moved run directory keeps its config's old output_dir.
    """

    config: RecipeConfig
    run_dir: Path
    config_file: Path = field(init=False)
    manifest_file: Path = field(init=False)
    summary_file: Path = field(init=False)
    summary_plot: Path = field(init=False)
    init_model: Path = field(init=False)

    def __post_init__(self) -> None:
        top = self.run_dir = Path(self.run_dir)
        self.config_file, self.manifest_file = top / "config.yaml", top / "manifest.json"
        self.summary_file, self.summary_plot = top / "summary.md", top / "summary.png"
        self.init_model = top / "init" / "model"

    @classmethod
    def for_recipe(cls, config: RecipeConfig) -> RunContext:
        return cls(config, Path(config.output_dir))

    @classmethod
    def load(cls, run_dir: str | Path) -> RunContext:
        """The context of an existing run directory, from its config.yaml."""
        return cls(load_run_config(Path(run_dir)), Path(run_dir))

    @property
    def pi_init(self) -> str:
        """The model the run starts from: the configured one, or its representation-edited version."""
        return str(self.init_model) if self.config.init else self.config.model.name

    # ---- one iteration's files

    def iteration_dir(self, t: int) -> Path:
        return self.run_dir / f"iter_{t:03d}"

    def responses(self, t: int) -> Path:
        return self.iteration_dir(t) / "responses.jsonl"

    def judgments(self, t: int) -> Path:
        return self.iteration_dir(t) / "judgments.jsonl"

    def pairs(self, t: int) -> Path:
        return self.iteration_dir(t) / "pairs.jsonl"

    def adapter(self, t: int) -> Path:
        return self.iteration_dir(t) / ADAPTER

    def checkpoints(self, t: int) -> Path:
        return self.iteration_dir(t) / CHECKPOINTS

    def metrics(self, t: int) -> Path:
        return self.iteration_dir(t) / "metrics.json"

    def eval_report(self, t: int) -> Path:
        return self.iteration_dir(t) / "eval.json"

    @property
    def reward_head(self) -> Path:
        """The bradley-terry labeller's head, fitted in the seed stage (selfie/labelling/bradley_terry.py)."""
        return self.iteration_dir(0) / "reward_head"

    @property
    def ensemble(self) -> Path:
        """The ensemble labeller's members (member_M/adapter), trained in the seed stage (selfie/labelling/ensemble.py)."""
        return self.iteration_dir(0) / "ensemble"

    def member_judgments(self, t: int) -> Path:
        """Where each member's judgments of iteration t go (member_M.jsonl: ensemble, consistency) before they are
        averaged."""
        return self.iteration_dir(t) / "ensemble"

    @property
    def fold_adapters(self) -> Path:
        """The label-signal check's fold adapters (fold_K/adapter), kept for the consistency labeller."""
        return self.iteration_dir(0) / "fold_adapters"

    def anchor_responses(self, t: int) -> Path:
        """pi_init's sample per prompt of an anchored run (judge.anchored), before it joins responses.jsonl."""
        return self.iteration_dir(t) / "anchor_responses.jsonl"

    def policy_responses(self, t: int) -> Path:
        """pi_{t-1}'s samples of an anchored run, before pi_init's join them in responses.jsonl."""
        return self.iteration_dir(t) / "policy_responses.jsonl"

    def signal_judgments(self, fold: int) -> Path:
        """The label-signal check's judgments of one fold's held-out seed pairs (selfie/labelling/signal.py)."""
        return self.iteration_dir(0) / "signal" / f"fold_{fold}.jsonl"

    def signal_work(self, fold: int) -> Path:
        """Where the fold's labeller is fitted (its adapter and checkpoints); removed once its judgments are written."""
        return self.iteration_dir(0) / "signal" / f"fold_{fold}"

    def eval_dir(self, t: int) -> Path:
        """The eval stage's responses and per-prompt scores, kept for inspection."""
        return self.iteration_dir(t) / "eval"

    @property
    def validation_pairs(self) -> Path:
        """The seed pairs held out of every training (`validation:`), cut from the seed pairs by the seed stage."""
        return self.iteration_dir(0) / "validation_pairs.jsonl"

    def validation_dir(self, t: int) -> Path:
        """The validate stage's samples (and, in iteration 0, pi_init's) and judgments (selfie/run/validation.py)."""
        return self.iteration_dir(t) / "validation"

    def validation_files(self, t: int) -> list[Path]:
        """What iteration t's validate stage writes."""
        names = ["samples.jsonl", "judgments.jsonl"] + (["init_samples.jsonl"] if t == 0 else [])
        return [self.validation_dir(t) / name for name in names]

    # ---- the plan, and what the run has done of it

    @property
    def plan(self) -> list[tuple[int, str]]:
        """Every (iteration, stage) of the run, in order (selfie/run/plan.py)."""
        return plan(self.config)

    def artifacts(self, t: int, stage: str) -> list[Path]:
        """What a completed stage leaves; the manifest records them (relative to RUN) with their checksums."""
        return BY_NAME[stage].writes(self, t)

    @property
    def fitted_labeller(self) -> list[Path]:
        """What the seed stage fits for `judge.labeller` beside the seed adapter (none for the implicit reward)."""
        fitted = {"bradley-terry": [self.reward_head], "ensemble": [self.ensemble], "consistency": [self.fold_adapters]}
        return fitted.get(self.config.judge.labeller, [])

    @property
    def held_out_pairs(self) -> list[Path]:
        """The validation pairs the seed stage cuts, when the recipe validates."""
        return [self.validation_pairs] if self.config.validation else []

    def relative(self, path: Path) -> str:
        return path.relative_to(self.run_dir).as_posix()

    def manifest(self) -> Manifest:
        """RUN/manifest.json as it is now; with none yet, an empty one holding the recipe's hash."""
        return Manifest.load(self.manifest_file, config_hash(self.config))

    def iterations_in_manifest(self) -> list[int]:
        """Iterations whose final adapter the manifest records: the seed stage done for 0, the train stage for t >= 1."""
        manifest = self.manifest()
        return [t for t in range(self.config.num_iterations + 1) if manifest.is_done(t, adapter_stage(t).name)]

    def adapters_on_disk(self) -> dict[int, Path]:
        """{iteration: adapter directory} of every adapter on disk, whether or not the manifest records its stage yet."""
        return {
            t: self.adapter(t)
            for t in range(self.config.num_iterations + 1)
            if (self.adapter(t) / "adapter_config.json").is_file()
        }

    def read_metrics(self, t: int) -> dict:
        return read_json(self.metrics(t)) if self.metrics(t).exists() else {}

    def partial_outputs(self) -> list[str]:
        """The resume points of generation and judge-spec scoring (`*.partial`), relative to RUN."""
        return sorted(self.relative(p) for p in self.run_dir.glob("iter_*/*.partial"))

    def drop_checkpoints(self, manifest: Manifest) -> None:
        """Trainer checkpoints are only resume points: once a stage's adapter is recorded they go (unless
        train.keep_checkpoints)."""
        if self.config.train.keep_checkpoints:
            return
        for t, stage in manifest.done_steps():
            if BY_NAME[stage].trains and self.checkpoints(t).exists():
                shutil.rmtree(self.checkpoints(t))


# ---- integrity ------------------------------------------------------------------------------------


def checksum(path: Path) -> dict:
    """What the manifest records of an artifact: a file's SHA-256 (and rows, for JSON Lines); a directory's (an
    adapter, a model) SHA-256 over its weight files, names included."""
    if path.is_dir():
        digest = hashlib.sha256()
        weights = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        for p in weights:
            digest.update(f"{p.relative_to(path)}\0{file_sha256(p)}\n".encode())
        return {"sha256": digest.hexdigest(), "weight_files": len(weights)}
    record = {"sha256": file_sha256(path)}
    if path.suffix == ".jsonl":
        record["rows"] = count_lines(path)
    return record


def _described(record: dict) -> str:
    rows = f"{record['rows']} rows, " if "rows" in record else ""
    return f"{rows}sha256 {record['sha256'][:12]}"


def artifact_problem(path: Path, recorded: dict | None) -> str | None:
    """Why an artifact no longer matches its manifest record (None: it does, or nothing was recorded)."""
    if not path.exists():
        return "missing"
    if recorded is None:
        return None
    now = checksum(path)
    if now != recorded:
        return f"changed since it was recorded ({_described(recorded)} then, {_described(now)} now)"
    return None


@dataclass
class Manifest:
    path: Path
    config_hash: str
    stages: list[dict] = field(default_factory=list)
    config_history: list[dict] = field(default_factory=list)  # one entry per --force change of recipe
    schema_version: int = SCHEMA_VERSION  # of the layout that wrote it (0: written before manifests kept it)
    stopped: dict | None = None  # {iteration, reason}: the stop rule ended the loop there (`--force` continues)

    @classmethod
    def load(cls, path: Path, config_hash: str) -> Manifest:
        if not path.exists():
            return cls(path, config_hash)
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or "config_hash" not in data:
            raise SelfieError(f"{path}: corrupt manifest (needs 'config_hash' and a 'stages' list)")
        for i, stage in enumerate(data["stages"]):
            if not isinstance(stage, dict) or {"iteration", "stage", "status"} - set(stage) or stage["stage"] not in BY_NAME:
                raise SelfieError(f"{path}: corrupt manifest entry stages[{i}]: {stage!r}")
        version = data.get("schema_version", 0)
        if not isinstance(version, int) or not 0 <= version <= SCHEMA_VERSION:
            raise SelfieError(
                f"{path}: schema_version {version!r}: not a layout this selfie reads (0..{SCHEMA_VERSION}); "
                "a later selfie wrote it?"
            )
        return cls(path, data["config_hash"], data["stages"], data.get("config_history", []), version, data.get("stopped"))

    def is_done(self, iteration: int, stage: str) -> bool:
        return any(s["iteration"] == iteration and s["stage"] == stage and s["status"] == "done" for s in self.stages)

    def done_steps(self) -> set[tuple[int, str]]:
        return {(s["iteration"], s["stage"]) for s in self.stages if s["status"] == "done"}

    def record(self, iteration: int, stage: str, artifacts: list[str]) -> None:
        """The stage is done: its artifacts (paths relative to RUN), each with its checksum."""
        checksums = {rel: checksum(self.path.parent / rel) for rel in artifacts}
        self.stages.append(
            {"iteration": iteration, "stage": stage, "status": "done", "artifacts": artifacts, "checksums": checksums}
        )
        self.save()

    def save(self) -> None:
        _write_if_changed(
            self.path,
            json.dumps(
                {
                    "schema_version": self.schema_version,
                    "config_hash": self.config_hash,
                    "config_history": self.config_history,
                    "stages": self.stages,
                }
                | ({"stopped": self.stopped} if self.stopped else {}),
                indent=2,
            )
            + "\n",
        )

    def verify(self, record_new: bool = True) -> int:
        """Check every recorded artifact against its checksum, stopping at the first that is missing or changed.
        Entries written before checksums existed get theirs now (`record_new`: trusted once, verified from then
        on); returns how many artifacts had none."""
        first_seen = 0
        for entry in self.stages:
            checksums = entry.get("checksums", {})
            for rel in entry.get("artifacts", []):
                path = self.path.parent / rel
                problem = artifact_problem(path, checksums.get(rel))
                if problem:
                    raise SelfieError(
                        f"{path}: {problem}; the manifest records it as the output of iteration "
                        f"{entry['iteration']}'s {entry['stage']} stage. Restore it, or run into a new output_dir"
                    )
                if rel not in checksums:
                    first_seen += 1
                    if record_new:
                        entry.setdefault("checksums", {})[rel] = checksum(path)
        return first_seen

    def next_stage(self, plan: list[tuple[int, str]]) -> tuple[int, str] | None:
        """The first step of `plan` not done; None when all are, or the stop rule ended the run."""
        return None if self.stopped else next((step for step in plan if not self.is_done(*step)), None)

    def stop(self, iteration: int, reason: str) -> None:
        self.stopped = {"iteration": iteration, "reason": reason}
        self.save()


def _write_if_changed(path: Path, text: str) -> None:
    """Atomically, and only when the text differs: resuming a finished run touches nothing."""
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)


# ---- opening a run --------------------------------------------------------------------------------


def read_run_config(run_dir: Path) -> tuple[RecipeConfig, dict]:
    """The run's config in this version's form (selfie/config/compat.py::upgrade_run; config.yaml's values upgrade
    alike whichever layout wrote them), and its config.yaml as written."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise SelfieError(f"{run_dir}: not a run directory (no config.yaml)")
    try:
        written = yaml.safe_load(path.read_text(encoding="utf-8"))
        return build_recipe(upgrade_run(RunState(written, None), 0).values), written
    except (yaml.YAMLError, TypeError, AttributeError, SelfieError) as e:
        raise SelfieError(f"{path}: unreadable run config ({str(e).splitlines()[0]})") from None


def load_run_config(run_dir: Path) -> RecipeConfig:
    return read_run_config(run_dir)[0]


def check_recipe(run_dir: Path, config: RecipeConfig, manifest: Manifest, force: bool) -> dict | None:
    """Refuse a recipe that changes results against the one the run was made with, naming the keys, unless
    `force`; then return the `config_history` entry recording the change (None: nothing changed)."""
    recorded = manifest.config_hash if manifest.path.exists() else None
    previous, run = None, RunState({}, recorded)
    if (run_dir / "config.yaml").exists():
        previous, written = read_run_config(run_dir)
        version = manifest.schema_version if recorded is not None else 0  # config.yaml alone: any layout's
        run = upgrade_run(RunState(written, recorded), version, config)
    if not run.not_reproduced and made_with(run, previous, config):
        return None
    changed = changed_values(previous, config) if previous is not None else {}
    changed.update(dict.fromkeys(run.not_reproduced))  # what this version would not reproduce of an earlier version's run
    current = config_hash(config)
    if not force:
        if changed:
            raise SelfieError(
                f"{run_dir}: recipe differs from the run's own config.yaml in {', '.join(changed)}; "
                "use the same recipe, a new output_dir, or --force"
            )
        raise SelfieError(
            f"{manifest.path}: made by a different recipe (config_hash {manifest.config_hash} != {current}); use --force"
        )
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "from": manifest.config_hash if manifest.path.exists() else None,
        "to": current,
        "changed": changed,
        "stages_done": len(manifest.stages),
    }


def open_run(ctx: RunContext, force: bool) -> Manifest:
    """Take over (or start) a run directory for its recipe: rank 0, under the lock, before any stage runs.

    The recipe is checked (check_recipe), recorded artifacts are verified, and the manifest (new hash, history,
    first checksums) is saved before config.yaml, so a kill in between leaves the manifest's recipe, which the
    next run writes out again. Then the leftovers of killed runs go.
    """
    run_dir, config = ctx.run_dir, ctx.config
    manifest = ctx.manifest()
    change = check_recipe(run_dir, config, manifest, force)
    if change:
        manifest.config_history.append(change)
        logger.warning(
            "%s: --force: continuing with a changed recipe (%s); the %d stages done stand",
            run_dir,
            ", ".join(change["changed"]) or "config_hash",
            len(manifest.stages),
        )
    if manifest.stopped and force:
        logger.warning(
            "%s: --force: continuing the loop the stop rule ended at iteration %d", run_dir, manifest.stopped["iteration"]
        )
        manifest.stopped = None
    manifest.config_hash, manifest.schema_version = config_hash(config), SCHEMA_VERSION
    first_seen = manifest.verify()
    if first_seen:
        logger.info("%s: recorded the checksums of %d artifacts made before the manifest kept them", manifest.path, first_seen)
    manifest.save()
    _write_if_changed(ctx.config_file, dump_recipe(config))
    for path in remove_leftovers(run_dir):
        logger.info("removed %s, left by a killed run", path)
    ctx.drop_checkpoints(manifest)
    return manifest


# ---- tidying --------------------------------------------------------------------------------------

# Temporary directories of atomic_directory / save_standalone before they took the .tmp suffix.
_OLD_TMP_DIR = re.compile(r"\.(adapter|model)\.[a-z0-9_]{8}")


def _is_leftover(path: Path) -> bool:
    name = path.name
    if name.startswith(".") and name.endswith(TMP_SUFFIX):
        return True
    if path.is_dir() and _OLD_TMP_DIR.fullmatch(name):
        return True
    # a trainer checkpoint is complete once refine_state.json (written last) is in it
    return path.parent.name == CHECKPOINTS and name.startswith("checkpoint-") and not (path / "refine_state.json").exists()


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Remove what killed runs leave: temporary files and directories, checkpoints cut before completion.
    (Partial generation or scoring output, `*.partial`, is a resume point and stays; wandb/ is wandb's own.)"""
    removed = []
    for path in sorted(run_dir.rglob(".*")) + sorted(run_dir.glob(f"iter_*/**/{CHECKPOINTS}/checkpoint-*")):
        if "wandb" in path.relative_to(run_dir).parts[:1] or not path.exists() or not _is_leftover(path):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path)
    return removed
