"""SPA with any scorer: the seed labelled by a gold judge, then self-labelled iterations with a per-iteration eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from selfie.evaluation.compare import generate_one
from selfie.io import read_jsonl
from selfie.run.rundir import RunContext
from selfie.run.stages import anchor_seed

from tiny import TOPICS as TINY_TOPICS

ROOT = Path(__file__).parent.parent
TOPICS = [*TINY_TOPICS, "rain", "a song", "bread", "stars"]


def run_with_gold_judge(tiny_model: str, tmp_path: Path, *, iteration_size: int, **sections: dict) -> Path:
    """`selfie run` of a one-iteration tiny recipe whose seed is labelled by the callable judge gold:vowels."""
    (tmp_path / "gold.py").write_text(
        textwrap.dedent("""
        def vowels(prompt, response):
            return sum(ch in "aeiou" for ch in response)
    """)
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"write about {t} please"}) + "\n" for t in TOPICS))
    values = {
        "num_iterations": 1,
        "report_to": [],
        "model": {"name": tiny_model},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {
            "prompts": str(prompts),
            "seed_judge": "callable:gold:vowels",
            "seed_size": 6,
            "iteration_sizes": [iteration_size],
        },
        "generate": {"max_new_tokens": 12, "batch_size": 4},
        "train": {"per_device_train_batch_size": 2, "learning_rate": 1e-3, "seed_epochs": 1, "max_length": 128},
    }
    for key, value in sections.items():
        values[key] = {**values.get(key, {}), **value}
    recipe = tmp_path / "gold.yaml"
    recipe.write_text(yaml.safe_dump(values))
    run_dir = tmp_path / "run"
    env = os.environ | {"WANDB_MODE": "offline", "PYTHONPATH": str(tmp_path)}
    cmd = [sys.executable, "-m", "selfie.cli.main", "run", str(recipe), "--output_dir", str(run_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def test_gold_labelled_seed_then_self_labelled_iteration_with_eval(tiny_model, tmp_path):
    prompts = str(tmp_path / "prompts.jsonl")
    run_dir = run_with_gold_judge(
        tiny_model,
        tmp_path,
        iteration_size=6,
        judge={"truncated": "keep"},  # a random tiny model rarely stops within 12 tokens
        eval={
            "judge": "callable:gold:vowels",
            "prompts": prompts,
            "num_prompts": 4,
            "max_new_tokens": 12,
            "baseline": "init",
            "n_boot": 200,
        },
    )

    seed = run_dir / "iter_000"
    responses = {row["prompt_id"]: row for row in read_jsonl(seed / "responses.jsonl")}
    pairs = read_jsonl(seed / "pairs.jsonl")
    assert len(responses) == 6 and all(len(row["responses"]) == 2 for row in responses.values())
    for pair in pairs:  # chosen is the response the gold judge scores higher
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert {chosen, rejected} == set(responses[pair["prompt_id"]]["responses"])
        assert sum(ch in "aeiou" for ch in chosen) >= sum(ch in "aeiou" for ch in rejected)
    metrics = json.loads((seed / "metrics.json").read_text())["seed"]
    assert metrics["labels"]["judge"] == "callable:gold:vowels" and metrics["labels"]["pairs"] == len(pairs) > 0
    assert metrics["pairs"] == len(pairs)

    held_out = {row["prompt_id"] for row in read_jsonl(run_dir / "iter_001" / "responses.jsonl")}
    assert not held_out & set(responses)  # the iteration's prompts are not the seed's
    evaluation = json.loads((run_dir / "iter_001" / "eval.json").read_text())
    assert evaluation["judge"] == "callable:gold:vowels" and evaluation["n"] == 4
    assert 0.0 <= evaluation["win_rate"] <= 1.0 and evaluation["ci95"][0] <= evaluation["win_rate"] <= evaluation["ci95"][1]
    assert json.loads((run_dir / "iter_001" / "metrics.json").read_text())["eval"]["win_rate"] == evaluation["win_rate"]
    assert "win rate" in (run_dir / "summary.md").read_text()
    judge_metrics = json.loads((run_dir / "iter_001" / "metrics.json").read_text())["judge"]
    pairs = read_jsonl(run_dir / "iter_001" / "pairs.jsonl")
    vowels = lambda text: sum(ch in "aeiou" for ch in text)  # noqa: E731
    agree = sum(vowels(p["chosen"][0]["content"]) > vowels(p["rejected"][0]["content"]) for p in pairs) / len(pairs)
    assert judge_metrics["eval_judge_agreement"] == agree  # self-labels against the eval judge, on the same pairs


def test_iterations_labelled_by_a_judge_with_length_control_and_replay(tiny_model, tmp_path):
    run_dir = run_with_gold_judge(
        tiny_model,
        tmp_path,
        iteration_size=8,
        data={"replay": 0.5},
        judge={"labeller": "callable:gold:vowels", "truncated": "penalize", "truncation_penalty": 0.5, "length_penalty": "auto"},
    )

    it = run_dir / "iter_001"
    responses = {row["prompt_id"]: row for row in read_jsonl(it / "responses.jsonl")}
    judgments = read_jsonl(it / "judgments.jsonl")
    for judged in judgments:  # the labeller's scores, not implicit rewards
        assert judged["rewards"] == [sum(ch in "aeiou" for ch in r) for r in responses[judged["prompt_id"]]["responses"]]
    metrics = json.loads((it / "metrics.json").read_text())
    alpha, pairs = metrics["judge"]["length_penalty"], read_jsonl(it / "pairs.jsonl")
    assert metrics["judge"]["labeller"] == "callable:gold:vowels" and isinstance(alpha, float)
    by_id = {j["prompt_id"]: j for j in judgments}
    for pair in pairs:  # chosen has the highest shaped score: vowels - alpha * tokens - 0.5 if cut off
        row, judged = responses[pair["prompt_id"]], by_id[pair["prompt_id"]]
        shaped = [
            s - alpha * n - 0.5 * (not done) for s, n, done in zip(judged["rewards"], judged["num_tokens"], row["finished"])
        ]
        assert shaped[row["responses"].index(pair["chosen"][0]["content"])] == max(shaped)
    assert metrics["train"]["replayed"] == len(pairs) == metrics["train"]["pairs"] / 2  # half the training set replayed
    assert "decided by truncation" in (run_dir / "summary.md").read_text()


def test_a_judged_seed_pairs_best_against_worst_and_anchored_pairs_reject_pi_inits_answer(tiny_model, tmp_path):
    run_dir = run_with_gold_judge(
        tiny_model,
        tmp_path,
        iteration_size=6,
        data={"seed_samples": 4},
        generate={"backend": "static"},  # as the test samples pi_init apart from the run
        judge={"labeller": "callable:gold:vowels", "truncated": "keep", "length_penalty": 0.0, "anchored": True},
    )
    vowels = lambda text: sum(ch in "aeiou" for ch in text)  # noqa: E731

    seed = {row["prompt_id"]: row for row in read_jsonl(run_dir / "iter_000" / "responses.jsonl")}
    assert all(len(row["responses"]) == 4 for row in seed.values())
    for pair in read_jsonl(run_dir / "iter_000" / "pairs.jsonl"):  # the judge's best against its worst of 4
        scores = [vowels(text) for text in seed[pair["prompt_id"]]["responses"]]
        assert (vowels(pair["chosen"][0]["content"]), vowels(pair["rejected"][0]["content"])) == (max(scores), min(scores))

    it = run_dir / "iter_001"
    anchors = read_jsonl(it / "anchor_responses.jsonl")
    config = RunContext.load(run_dir).config
    g = config.generate
    pi_init = generate_one(  # pi_init's own answers, sampled apart from the run with the anchor's seed
        tiny_model,
        None,
        [{"prompt_id": row["prompt_id"], "prompt": row["prompt"]} for row in anchors],
        tmp_path / "pi_init.jsonl",
        dtype=config.model,
        max_new_tokens=g.max_new_tokens,
        temperature=g.temperature,
        top_p=g.top_p,
        seed=anchor_seed(config.seed, 1),
        batch_size=g.batch_size,
        backend="static",
    )
    anchor_of = {row["prompt_id"]: text for row, text in zip(anchors, pi_init)}
    assert [row["responses"][0] for row in anchors] == pi_init
    responses = {row["prompt_id"]: row for row in read_jsonl(it / "responses.jsonl")}
    assert all(row["anchor"] == 2 and row["responses"][2] == anchor_of[pid] for pid, row in responses.items())
    pairs, dropped = read_jsonl(it / "pairs.jsonl"), json.loads((it / "metrics.json").read_text())["judge"]["dropped"]
    assert len(pairs) + sum(dropped.values()) == 6 and pairs
    for pair in pairs:  # the rejected is pi_init's answer, the chosen the labeller's best of pi_0's two
        row = responses[pair["prompt_id"]]
        assert pair["rejected"][0]["content"] == anchor_of[pair["prompt_id"]]
        assert vowels(pair["chosen"][0]["content"]) == max(vowels(text) for text in row["responses"][:2])
    assert dropped["anchor_preferred"] == sum(
        vowels(row["responses"][2]) > max(vowels(text) for text in row["responses"][:2]) for row in responses.values()
    )
