"""The SPA loop (docs/METHOD.md section 1): seed DPO, then generate -> judge -> train (-> eval) per iteration.

Each stage is a function from (config, previous artifacts) to new artifacts in the run directory;
the manifest records it once its artifacts are complete, so re-running the same command resumes
after the last completed stage (and inside generation / training from their own resume points).
Under `accelerate launch` every rank runs this file: generation and judging are sharded across
ranks and merged on rank 0, training is distributed by the trainer itself.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate.utils import broadcast_object_list, gather_object

from selfie.config import RecipeConfig, config_hash, to_dict
from selfie.dist import check_topology, process_state
from selfie.errors import SelfieError, os_error_line, out_of_space
from selfie.io import atomic_write_json, atomic_write_jsonl, read_json, read_jsonl
from selfie.preflight import preflight
from selfie.rundir import TRAINED, Manifest, RunLock, drop_checkpoints, iteration_dir, open_run, plan, stage_artifacts
from selfie.tracking import Tracker, write_summary

logger = logging.getLogger(__name__)


class Loop:
    def __init__(self, config: RecipeConfig, force: bool = False):
        check_topology()
        self.config = config
        self.run_dir = Path(config.output_dir)
        self.state = process_state()
        self.is_main = self.state.is_main_process
        self.lock = RunLock(self.run_dir)
        self._data = None
        self._on_main_then_share(lambda: self._open(force))
        self.manifest = Manifest.load(self.run_dir / "manifest.json", config_hash(config))  # as rank 0 left it
        self.run_name = config.run_name or self.run_dir.name
        self.tracker = Tracker(self.run_dir, self.run_name, config.report_to, to_dict(config), self.is_main)

    def _open(self, force: bool) -> None:
        """Rank 0: check everything the remaining stages need before writing anything, then take the directory over."""
        done = Manifest.load(self.run_dir / "manifest.json", "").done_steps()
        self._data = preflight(self.config, done).splits
        self.lock.acquire()
        try:
            open_run(self.run_dir, self.config, force)
        except BaseException:
            self.lock.release()
            raise

    def _on_main_then_share(self, fn: Callable[[], Any]) -> Any:
        """Run fn on rank 0 only; every rank gets its result, or raises its error (no rank left waiting)."""
        box: list[Any] = [None, None]
        if self.is_main:
            try:
                box = [fn(), None]
            except SelfieError as e:
                box = [None, str(e)]
            except OSError as e:
                box = [None, os_error_line(e)]
        if self.state.num_processes > 1:
            broadcast_object_list(box)
        if box[1] is not None:
            raise SelfieError(box[1])
        return box[0]

    # ---- artifacts shared by stages -------------------------------------------------------------

    @property
    def pi_init(self) -> str:
        """The model the run starts from: the configured one, or its representation-edited version."""
        return str(self.run_dir / "init" / "model") if self.config.init else self.config.model.name

    def adapter(self, iteration: int) -> Path:
        return iteration_dir(self.run_dir, iteration) / "adapter"

    @property
    def data(self):
        if self._data is None:
            from selfie.data import load_prompts, split_prompts

            d = self.config.data
            self._data = split_prompts(load_prompts(d.prompts, d.split), d.seed_size, d.iteration_sizes, d.shuffle_seed)
        return self._data

    def metrics_path(self, iteration: int) -> Path:
        return iteration_dir(self.run_dir, iteration) / "metrics.json"

    def read_metrics(self, iteration: int) -> dict:
        path = self.metrics_path(iteration)
        return read_json(path) if path.exists() else {}

    def _finish_stage(self, iteration: int, stage: str, metrics: dict | None, seconds: float) -> None:
        if self.is_main:
            merged = self.read_metrics(iteration)
            if metrics is not None:
                merged[stage] = metrics
            merged.setdefault("times", {})[stage] = round(seconds, 2)
            atomic_write_json(self.metrics_path(iteration), merged)
            self.tracker.log({stage: metrics or {}, "time": {stage: seconds}})
            self.manifest.record(iteration, stage, stage_artifacts(iteration, stage))
            if stage in TRAINED:
                drop_checkpoints(self.run_dir, self.manifest, self.config.train.keep_checkpoints)
        else:
            self.manifest.stages.append({"iteration": iteration, "stage": stage, "status": "done"})
        self.state.wait_for_everyone()

    # ---- stages ---------------------------------------------------------------------------------

    def stage_init(self, iteration: int) -> dict:
        from selfie.edit import build_edited_model

        target = self.run_dir / "init" / "model"
        self._on_main_then_share(lambda: build_edited_model(self.config.init, self.config.model.name, target, self.config.seed))
        return {"method": self.config.init.method}

    def stage_seed(self, iteration: int) -> dict:
        from selfie.trainer import train_seed

        pairs_path = iteration_dir(self.run_dir, 0) / "pairs.jsonl"
        labels = self.gold_labels(pairs_path) if self.config.data.seed_judge else None
        self._on_main_then_share(lambda: pairs_path.exists() or atomic_write_jsonl(pairs_path, self.seed_pairs()))
        metrics = train_seed(self.pi_init, read_jsonl(pairs_path), iteration_dir(self.run_dir, 0), self.config)
        if labels:
            metrics["labels"] = labels
        return metrics

    def seed_pairs(self) -> list[dict]:
        """The labelled seed set: `data.seed_pairs`, else the labels of the pool's seed slice (SPA's split)."""
        from selfie.data import load_preferences, seed_slice_pairs

        d = self.config.data
        if d.seed_pairs == "alignez":
            return self.alignez_seed_pairs()
        if d.seed_pairs:
            return load_preferences(d.seed_pairs, d.split)
        return seed_slice_pairs(d.prompts, d.split, self.data.seed)

    def alignez_seed_pairs(self) -> list[dict]:
        """AlignEZ's self-generated helpful / harmful pairs as the seed (no human label); an AlignEZ init's own
        data is reused."""
        from selfie.config import AlignEZConfig
        from selfie.edit import alignez_seed_pairs, work_dir_for

        init = self.config.init if isinstance(self.config.init, AlignEZConfig) else None
        return alignez_seed_pairs(self.config.model.name, init, work_dir_for(self.run_dir / "init" / "model"), self.config.seed)

    def gold_labels(self, pairs_path: Path) -> dict | None:
        """Label the seed slice with `data.seed_judge` instead of human labels: 2 samples of pi_init per prompt,
        chosen / rejected by the judge's scores under the truncation policy (no length penalty: these are the
        gold labels). Writes iter_000/pairs.jsonl; returns the labelling metrics."""
        from selfie.evaluation.judges import load_judge
        from selfie.evaluation.labels import score_responses
        from selfie.pairs import select_pairs

        if pairs_path.exists():
            return None  # labelled before an interruption
        d = self.config.data
        if not self.data.seed:
            raise SelfieError("data.seed_judge is set but the seed slice is empty; set data.seed_size")
        responses, generate_metrics = self._generate(0, self.data.seed, adapter=None, num_responses=2)

        def label() -> dict:
            rows = read_jsonl(responses)
            judgments = score_responses(load_judge(d.seed_judge, self.config.model.dtype), rows, *self.tokenizer_and_stops())
            pairs, metrics = select_pairs(rows, judgments, dataclasses.replace(self.config.judge.rules, length_penalty=0.0))
            if not pairs:
                raise SelfieError(f"data.seed_judge '{d.seed_judge}': no seed pair survived labelling (dropped: {metrics['dropped']})")
            atomic_write_jsonl(pairs_path, pairs)
            return {"judge": d.seed_judge, **metrics, "generate": generate_metrics}

        return self._on_main_then_share(label)

    def _sharded(self, iteration: int, name: str, work: Callable[[Path, tuple[int, int]], dict]) -> tuple[Path, list[dict]]:
        """Run `work` on this rank's shard; rank 0 merges the shard files (sorted by prompt_id) into RUN/iter_t/name."""
        final = iteration_dir(self.run_dir, iteration) / name
        world, rank = self.state.num_processes, self.state.process_index
        if world == 1:
            return final, [work(final, (0, 1))]
        metrics = gather_object([work(shard_path(final, rank, world), (rank, world))])
        if self.is_main:
            merge_shards(final, world)
        self.state.wait_for_everyone()
        return final, metrics

    def stage_generate(self, t: int) -> dict:
        return self._generate(t, self.data.iterations[t - 1], self.adapter(t - 1), self.config.generate.num_responses)[1]

    def _generate(self, t: int, prompts: list[dict], adapter: Path | None, num_responses: int) -> tuple[Path, dict]:
        """RUN/iter_t/responses.jsonl from pi_init + adapter, sharded over the ranks."""
        from selfie.generate import generate_responses
        from selfie.models import load_policy

        g = self.config.generate
        model, tokenizer = load_policy(self.pi_init, adapter, self.config.model.dtype)
        model.to(self.state.device)
        path, shard_metrics = self._sharded(t, "responses.jsonl", lambda out, shard: generate_responses(
            model, tokenizer, prompts, out, num_responses=num_responses, max_new_tokens=g.max_new_tokens,
            temperature=g.temperature, top_p=g.top_p, seed=self.config.seed + t, batch_size=g.batch_size, shard=shard,
            backend=g.backend))
        return path, combine_metrics(shard_metrics)

    def stage_judge(self, t: int) -> dict:
        """Score the responses (implicit reward, or `judge.labeller`), then make pairs by the judge rules on rank 0."""
        j = self.config.judge
        responses = read_jsonl(iteration_dir(self.run_dir, t) / "responses.jsonl")
        if j.labeller == "implicit":
            judgments, metrics = self._judge_implicit(t, responses)
        else:
            judgments, metrics = self._judge_with(j.labeller, t, responses)
        pairs_path = iteration_dir(self.run_dir, t) / "pairs.jsonl"
        labels = self._on_main_then_share(lambda: self._write_pairs(responses, read_jsonl(judgments), pairs_path))
        return {**metrics, **labels, "labeller": j.labeller}

    def _judge_implicit(self, t: int, responses: list[dict]) -> tuple[Path, dict]:
        from selfie.implicit_reward import judge_responses
        from selfie.models import load_policy

        j = self.config.judge
        policy, tokenizer = load_policy(self.pi_init, self.adapter(t - 1), self.config.model.dtype)
        policy.to(self.state.device)
        path, shard_metrics = self._sharded(t, "judgments.jsonl", lambda out, shard: judge_responses(
            policy, tokenizer, responses, out, None, beta=self.config.train.beta, length_normalize=j.length_normalize,
            token_budget=j.token_budget, shard=shard))
        return path, combine_metrics(shard_metrics)

    def _judge_with(self, spec: str, t: int, responses: list[dict]) -> tuple[Path, dict]:
        """judgments.jsonl scored by a judge spec (reward model, Python callable, ...) on rank 0."""
        from selfie.evaluation.judges import load_judge
        from selfie.evaluation.labels import score_responses

        path = iteration_dir(self.run_dir, t) / "judgments.jsonl"

        def score() -> dict:
            start = time.perf_counter()
            tokenizer, stop_ids = self.tokenizer_and_stops()
            atomic_write_jsonl(path, score_responses(load_judge(spec, self.config.model.dtype), responses, tokenizer, stop_ids))
            return {"prompts": len(responses), "seconds": round(time.perf_counter() - start, 3)}

        return path, self._on_main_then_share(score)

    def tokenizer_and_stops(self):
        from selfie.models import load_generation_config, load_tokenizer
        from selfie.tokens import stop_token_ids

        tokenizer = load_tokenizer(self.pi_init)
        return tokenizer, stop_token_ids(load_generation_config(self.pi_init), tokenizer)

    def _write_pairs(self, responses: list[dict], judgments: list[dict], pairs_path: Path) -> dict:
        """pairs.jsonl from judged responses (rows matched by prompt_id); returns the label metrics."""
        from selfie.pairs import select_pairs

        by_id = {row["prompt_id"]: row for row in responses}
        pairs, metrics = select_pairs([by_id[j["prompt_id"]] for j in judgments], judgments, self.config.judge.rules)
        if self.config.eval:  # how often the self-labels agree with the judge the run is evaluated by
            from selfie.evaluation.judges import load_judge
            from selfie.evaluation.labels import pair_agreement

            metrics["eval_judge_agreement"] = pair_agreement(load_judge(self.config.eval.judge, self.config.model.dtype), pairs)
        atomic_write_jsonl(pairs_path, pairs)
        return metrics

    def stage_train(self, t: int) -> dict:
        from selfie.pairs import with_replay
        from selfie.trainer import train_iteration

        pairs = read_jsonl(iteration_dir(self.run_dir, t) / "pairs.jsonl")
        if not pairs:
            raise SelfieError(f"{iteration_dir(self.run_dir, t) / 'pairs.jsonl'}: no training pairs survived judging")
        replay = self.config.data.replay
        if replay:
            seed_pairs = read_jsonl(iteration_dir(self.run_dir, 0) / "pairs.jsonl")
            pairs = with_replay(pairs, seed_pairs, replay, self.config.seed + t)
        metrics = train_iteration(self.pi_init, self.adapter(t - 1), pairs, iteration_dir(self.run_dir, t), self.config, t)
        metrics["replayed"] = sum(bool(p.get("replay")) for p in pairs)
        return metrics

    def stage_eval(self, t: int) -> dict:
        from selfie.evaluation.compare import evaluate_iteration

        metrics = self._on_main_then_share(lambda: evaluate_iteration(self.config.eval, self.pi_init, self.adapter(t), self.config))
        path = iteration_dir(self.run_dir, t) / "eval.json"
        if self.is_main:
            atomic_write_json(path, metrics)
        return metrics

    # ---- driver ---------------------------------------------------------------------------------

    def run(self) -> str:
        where = "the summary"
        try:
            current = None
            for iteration, stage in plan(self.config):
                if self.manifest.is_done(iteration, stage):
                    continue
                if iteration != current:
                    self.tracker.finish()
                    self.tracker.start(iteration)
                    current = iteration
                logger.info("iteration %d: %s", iteration, stage)
                where = f"iteration {iteration}'s {stage} stage"
                start = time.perf_counter()
                metrics = getattr(self, f"stage_{stage}")(iteration)
                self._finish_stage(iteration, stage, metrics, time.perf_counter() - start)
            self.tracker.finish()
            return self.summary()
        except BaseException as e:
            self.tracker.finish(failed=True)  # now, so that wandb's closing lines come before the error line
            if isinstance(e, (OSError, RuntimeError)) and out_of_space(e, self.run_dir):
                raise SelfieError(f"{self.run_dir}: no space left on device during {where}; free some space and run "
                                  "the same command again: it resumes from the last completed step") from e
            raise
        finally:
            self.lock.release()

    def summary(self) -> str:
        if not self.is_main:
            return ""
        per_iteration = {t: self.read_metrics(t) for t in range(self.config.num_iterations + 1)}
        return write_summary(self.run_dir, per_iteration)


def shard_path(final: Path, rank: int, world: int) -> Path:
    """Where rank `rank` of `world` writes its part of `final`."""
    return final.with_name(f"{final.stem}.rank{rank}-of-{world}{final.suffix}")


def merge_shards(final: Path, world: int) -> None:
    """Rank 0: the ranks' parts of `final` as one file (rows sorted by prompt_id), the parts removed."""
    shards = [shard_path(final, rank, world) for rank in range(world)]
    atomic_write_jsonl(final, sorted((row for path in shards for row in read_jsonl(path)), key=lambda row: row["prompt_id"]))
    for path in shards:
        path.unlink()


def combine_metrics(shards: list[dict]) -> dict:
    """Merge per-rank stage metrics: counts add up, wall time is the slowest rank's, rates are recomputed."""
    if len(shards) == 1:
        return shards[0]
    merged: dict[str, Any] = {}
    for shard in shards:
        for key, value in shard.items():
            if isinstance(value, dict):
                merged[key] = combine_metrics([merged.get(key, {}), value]) if key in merged else dict(value)
            elif key == "seconds":
                merged[key] = max(merged.get(key, 0.0), value)
            elif isinstance(value, (int, float)) and not key.endswith(("per_second", "fraction", "mean")):
                merged[key] = merged.get(key, 0) + value
            elif isinstance(value, str):  # e.g. the generation backend each rank used
                merged[key] = value if merged.get(key, value) == value else "mixed"
    seconds = merged.get("seconds") or 0.0
    for rate, count in (("tokens_per_second", "new_tokens"), ("pairs_per_second", "pairs")):
        if count in merged and seconds:
            merged[rate] = merged[count] / seconds
    return merged


def run_loop(config: RecipeConfig, force: bool = False) -> str:
    """Run (or resume) the whole recipe; returns the summary table (markdown) on rank 0."""
    return Loop(config, force).run()
