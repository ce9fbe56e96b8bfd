"""The stages of a run (docs/METHOD.md section 1): each is a function (ctx, t) -> metrics attached to its entry in
selfie/run/plan.py (`@STAGE.runs`), writing the artifacts that entry names and nothing the manifest relies on before.

Every rank calls every stage: generation and judging (implicit reward or a judge spec) are sharded over the ranks
and merged on rank 0; what only rank 0 does (writing pairs, the edit, evaluation) goes through
`ctx.ranks.on_main`, which hands every rank its result or its error; training is distributed by the trainer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from selfie.config.schema import AlignEZConfig, GenerateConfig
from selfie.data import seed_preferences
from selfie.edit import alignez_seed_pairs, build_edited_model, work_dir_for
from selfie.errors import SelfieError
from selfie.evaluation.judges import load_judge
from selfie.evaluation.labels import pair_agreement
from selfie.generation.generate import generate_responses, load_generator
from selfie.io import atomic_write_json, atomic_write_jsonl, read_jsonl
from selfie.labelling.implicit_reward import judge_responses
from selfie.labelling.pairs import select_pairs, with_replay
from selfie.run import validation
from selfie.run.context import StageContext, policy_shards, spec_scores
from selfie.run.evaluation import evaluate_iteration
from selfie.run.guard import best_iteration, failed_checks
from selfie.run.labellers import label_signal, labeller_for
from selfie.run.plan import BY_NAME, EVAL, GENERATE, INIT, JUDGE, SEED, TRAIN, VALIDATE
from selfie.run.seed_choice import choose_seed_training
from selfie.training.stage import TrainOutputs, train_iteration, train_seed

ANCHOR_SEED_OFFSET = 1_000_003


@INIT.runs
def init(ctx: StageContext, t: int) -> dict:
    """The representation-edited pi_init (AlignEZ or RAHF), built on rank 0."""
    c = ctx.config
    ctx.ranks.on_main(lambda: build_edited_model(c.init, c.model.name, ctx.init_model, c.seed, c.model))
    return {"method": c.init.method}


@SEED.runs
def seed(ctx: StageContext, t: int) -> dict:
    """Seed DPO on the labelled seed pairs: `data.seed_pairs`, the pool's labelled seed slice, or that slice's
    samples labelled by `data.seed_judge`."""
    pairs_path = ctx.pairs(0)
    labels = judge_seed_slice(ctx) if ctx.config.data.seed_judge and not pairs_path.exists() else None
    ctx.ranks.on_main(lambda: write_seed_pairs(ctx))
    if ctx.config.validation:
        ctx.ranks.on_main(lambda: validation.hold_out(ctx))
    config, choice = choose_seed_training(ctx) if ctx.config.train.seed_candidates else (ctx.config, None)
    metrics = train_seed(ctx.pi_init, read_jsonl(pairs_path), _train_outputs(ctx, 0), config)
    fit = labeller_for(ctx.config.judge.labeller).fit
    if fit:  # with the chosen settings of the seed training
        metrics["labeller"] = fit(dataclasses.replace(ctx, config=config))
    if choice:
        metrics["seed_choice"] = choice
        metrics["label_signal"] = choice["candidates"][choice["chosen"]]["label_signal"]
    else:
        metrics["label_signal"] = label_signal(ctx)
    return {**metrics, "labels": labels} if labels else metrics


@GENERATE.runs
def generate(ctx: StageContext, t: int) -> dict:
    """`generate.num_responses` samples of pi_{t-1} per prompt of iteration t's slice; with `judge.anchored`, one more
    of pi_init (adapter off) joins each row as its `anchor`."""
    c, prompts = ctx.config, ctx.splits.iterations[t - 1]
    if not c.judge.anchored:
        return _generate(ctx, c.seed + t, prompts, ctx.adapter(t - 1), c.generate.num_responses, ctx.responses(t))
    metrics = _generate(ctx, c.seed + t, prompts, ctx.adapter(t - 1), c.generate.num_responses, ctx.policy_responses(t))
    anchor = _generate(ctx, anchor_seed(c.seed, t), prompts, None, 1, ctx.anchor_responses(t))
    rows = (read_jsonl(ctx.policy_responses(t)), read_jsonl(ctx.anchor_responses(t)))
    ctx.ranks.on_main(lambda: atomic_write_jsonl(ctx.responses(t), with_anchors(*rows)))
    return {**metrics, "anchor": anchor}


@JUDGE.runs
def judge(ctx: StageContext, t: int) -> dict:
    """Score the responses by `judge.labeller` (selfie/run/labellers.py; the implicit reward of pi_{t-1} against
    pi_init by default), then pairs by the judge rules on rank 0."""
    labeller = ctx.config.judge.labeller
    responses = read_jsonl(ctx.responses(t))
    metrics = labeller_for(labeller).judge(ctx, t, responses)
    labels = ctx.ranks.on_main(lambda: _write_pairs(ctx, t, responses))
    return {**metrics, **labels, "labeller": labeller}


@TRAIN.runs
def train(ctx: StageContext, t: int) -> dict:
    """Noise-aware DPO of pi_{t-1} on iteration t's pairs (plus replayed seed pairs)."""
    pairs = read_jsonl(ctx.pairs(t))
    if not pairs:
        raise SelfieError(f"{ctx.pairs(t)}: no training pairs survived judging")
    if ctx.config.data.replay:
        pairs = with_replay(pairs, read_jsonl(ctx.pairs(0)), ctx.config.data.replay, ctx.config.seed + t)
    metrics = train_iteration(ctx.pi_init, ctx.adapter(t - 1), pairs, _train_outputs(ctx, t), ctx.config, t)
    return {**metrics, "replayed": sum(bool(p.get("replay")) for p in pairs)}


def _train_outputs(ctx: StageContext, t: int) -> TrainOutputs:
    """Where iteration t's training writes, and its name in the trackers (`<run name>-iter_TTT`)."""
    run_name = f"{ctx.config.run_name or ctx.run_dir.name}-{ctx.iteration_dir(t).name}"
    return TrainOutputs(adapter=ctx.adapter(t), checkpoints=ctx.checkpoints(t), run_name=run_name)


@EVAL.runs
def evaluate(ctx: StageContext, t: int) -> dict:
    """pi_t against `eval.baseline` on held-out prompts, scored by `eval.judge`, on rank 0."""

    def run() -> dict:
        metrics = evaluate_iteration(ctx, t)
        atomic_write_json(ctx.eval_report(t), metrics)
        return metrics

    return ctx.ranks.on_main(run)


@VALIDATE.runs
def validate(ctx: StageContext, t: int) -> dict:
    """pi_t on the held-out seed pairs and on one sample per held-out prompt (with pi_init's samples of the same
    prompts in iteration 0), scored in one pass against pi_init; then the checks of the stop rule and the best
    iteration so far (selfie/run/validation.py, selfie/run/guard.py)."""
    c, out = ctx.config, ctx.validation_dir(t)
    rows = validation.pair_rows(ctx)
    prompts = validation.drift_prompts(ctx, ctx.splits.held_out if ctx.splits else [], rows)
    if not prompts:
        ctx.ranks.on_main(lambda: [atomic_write_jsonl(path, []) for path in ctx.validation_files(t)])
        return {"skipped": "the seed stage held no pairs out (it ran without validation:) and validation.prompts is 0"}
    samples = {validation.SAMPLE: (ctx.adapter(t), out / "samples.jsonl")}
    if t == 0:
        samples[validation.INIT_SAMPLE] = (None, ctx.validation_dir(0) / "init_samples.jsonl")
    scored = list(rows)
    for prefix, (adapter, path) in samples.items():
        if not path.exists():
            _generate(ctx, c.seed, prompts, adapter, 1, path, validation.policy_sampling(c.generate))
        scored += validation.as_scored(read_jsonl(path), prefix)
    if not (out / "judgments.jsonl").exists():
        sums = dataclasses.replace(c.judge, length_normalize=False)  # DPO's sequence log-probs
        policy_shards(
            ctx,
            ctx.adapter(t),
            out / "judgments.jsonl",
            lambda policy, tokenizer, path, shard: judge_responses(
                policy, tokenizer, scored, path, None, beta=c.train.beta, judge=sums, shard=shard
            ),
        )
    return ctx.ranks.on_main(lambda: _validation_metrics(ctx, t, rows))


def _validation_metrics(ctx: StageContext, t: int, rows: list[dict]) -> dict:
    c, v = ctx.config, ctx.config.validation
    judgments = read_jsonl(ctx.validation_dir(t) / "judgments.jsonl")
    init_judgments = judgments if t == 0 else read_jsonl(ctx.validation_dir(0) / "judgments.jsonl")
    init = validation.drift(init_judgments, read_jsonl(ctx.validation_dir(0) / "init_samples.jsonl"), validation.INIT_SAMPLE)
    before = ctx.validation_dir(t - 1) / "judgments.jsonl"
    previous = read_jsonl(before) if t > 0 and before.exists() and rows else None
    samples = read_jsonl(ctx.validation_dir(t) / "samples.jsonl")
    metrics = validation.measures(v, rows, judgments, samples, init, previous, c.seed)
    eval_before = ctx.read_metrics(t - 1).get(EVAL.name) if t > 0 else None
    metrics["failed"] = failed_checks(v, metrics, ctx.read_metrics(t).get(EVAL.name), eval_before)
    validated = {i: ctx.read_metrics(i).get(VALIDATE.name, {}) for i in range(t)} | {t: metrics}
    metrics["best_iteration"] = best_iteration(validated)
    metrics["stop"] = bool(v.stop and metrics["failed"])
    return metrics


def run_stage(ctx: StageContext, t: int, name: str) -> dict:
    """Run iteration t's stage `name`; returns its metrics."""
    return BY_NAME[name].run(ctx, t)


# ---- what the stages share --------------------------------------------------------------------------


def _generate(
    ctx: StageContext,
    seed: int,
    prompts: list[dict],
    adapter: Path | None,
    num_responses: int,
    output: Path,
    settings: GenerateConfig | None = None,
) -> dict:
    """`output`'s responses from pi_init + adapter (sampled as `settings` say, default `generate:`), sharded over the
    ranks (with vLLM: one engine per rank)."""
    c, g = ctx.config, settings or ctx.config.generate
    model, tokenizer = load_generator(ctx.pi_init, adapter, c.model, g.backend, ctx.ranks.device, g)
    return ctx.ranks.sharded(
        output,
        lambda out, shard: generate_responses(
            model,
            tokenizer,
            prompts,
            out,
            num_responses=num_responses,
            max_new_tokens=g.max_new_tokens,
            temperature=g.temperature,
            top_p=g.top_p,
            seed=seed,
            batch_size=g.batch_size,
            shard=shard,
            backend=g.backend,
        ),
    )


def write_seed_pairs(ctx: StageContext) -> None:
    """RUN/iter_000/pairs.jsonl from `seed_pairs`, unless judge_seed_slice (or an interrupted seed stage) wrote it."""
    if not ctx.pairs(0).exists():
        atomic_write_jsonl(ctx.pairs(0), seed_pairs(ctx))


def seed_pairs(ctx: StageContext) -> list[dict]:
    """The labelled seed set: `data.seed_pairs` (a set, or AlignEZ's self-generated pairs), else the labels of the
    pool's seed slice (SPA's split)."""
    c, d = ctx.config, ctx.config.data
    if d.seed_pairs == "alignez":  # no human label; an AlignEZ init's own data is reused
        init = c.init if isinstance(c.init, AlignEZConfig) else None
        return alignez_seed_pairs(c.model.name, init, work_dir_for(ctx.init_model), c.seed, c.model)
    return seed_preferences(d, ctx.splits.seed)


def anchor_seed(seed: int, t: int) -> int:
    """pi_init's anchor samples draw other random numbers than pi_{t-1}'s (the same seed would share them)."""
    return seed + t + ANCHOR_SEED_OFFSET


def with_anchors(policy: list[dict], anchors: list[dict]) -> list[dict]:
    """Each policy row with pi_init's response for its prompt appended, its index as the row's `anchor`."""
    by_id = {row["prompt_id"]: row for row in anchors}
    return [
        {
            **row,
            "responses": row["responses"] + by_id[row["prompt_id"]]["responses"],
            "finished": row["finished"] + by_id[row["prompt_id"]]["finished"],
            "anchor": len(row["responses"]),
        }
        for row in policy
    ]


def judge_seed_slice(ctx: StageContext) -> dict:
    """Label the seed slice with `data.seed_judge` instead of human labels: `data.seed_samples` samples of pi_init per
    prompt, chosen / rejected (the judge's best and worst) by its scores under the truncation policy (no length
    penalty: these are the gold labels). Writes the seed pairs; returns the labelling metrics."""
    c, spec = ctx.config, ctx.config.data.seed_judge
    if not ctx.splits.seed:
        raise SelfieError("data.seed_judge is set but the seed slice is empty; set data.seed_size")
    generate_metrics = _generate(ctx, c.seed, ctx.splits.seed, None, c.data.seed_samples, ctx.responses(0))
    rows = read_jsonl(ctx.responses(0))
    score_metrics = spec_scores(ctx, spec, rows, ctx.judgments(0))

    def label() -> dict:
        judged, judgments = _judged_rows(rows, read_jsonl(ctx.judgments(0)))
        pairs, metrics = select_pairs(judged, judgments, dataclasses.replace(c.judge.rules, length_penalty=0.0))
        if not pairs:
            raise SelfieError(f"data.seed_judge '{spec}': no seed pair survived labelling (dropped: {metrics['dropped']})")
        atomic_write_jsonl(ctx.pairs(0), pairs)
        return {"judge": spec, **metrics, "generate": generate_metrics, "score": score_metrics}

    return ctx.ranks.on_main(label)


def _write_pairs(ctx: StageContext, t: int, responses: list[dict]) -> dict:
    """Iteration t's pairs from its judged responses (rows matched by prompt_id); returns the label metrics."""
    c = ctx.config
    pairs, metrics = select_pairs(*_judged_rows(responses, read_jsonl(ctx.judgments(t))), c.judge.rules)
    if c.eval:  # how often the self-labels agree with the judge the run is evaluated by
        metrics["eval_judge_agreement"] = pair_agreement(load_judge(c.eval.judge, c.model.dtype), pairs)
    atomic_write_jsonl(ctx.pairs(t), pairs)
    return metrics


def _judged_rows(responses: list[dict], judgments: list[dict]) -> tuple[list[dict], list[dict]]:
    """The response rows in the judgments' order (matched by prompt_id), and the judgments."""
    by_id = {row["prompt_id"]: row for row in responses}
    return [by_id[j["prompt_id"]] for j in judgments], judgments
