"""The label-signal check: its arithmetic on hand-built judgments, and the seed stage's check on the tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from selfie.config.loader import load_recipe
from selfie.config.schema import JudgeConfig
from selfie.labelling.signal import fold_indices, heldout_rows, signal_accuracy, signal_line, weak
from selfie.run.loop import run_loop
from selfie.run.rundir import RunContext
from selfie.run.status import status_text

from tiny import TOPICS


def pair(prompt: str, chosen: str, rejected: str, **flags) -> dict:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        **flags,
    }


def test_folds_cover_every_pair_once():
    folds = fold_indices(11, 3, seed=5)
    assert sorted(i for f in folds for i in f) == list(range(11))
    assert [len(f) for f in folds] == [4, 4, 3]
    assert folds == fold_indices(11, 3, seed=5)


def test_heldout_rows_place_the_gold_response_by_a_seeded_coin():
    pairs = [pair(f"q{i}", f"good {i}", f"bad {i}") for i in range(40)]
    rows = heldout_rows(pairs, range(40), seed=1)
    assert all(row["responses"][row["gold"]] == f"good {i}" for i, row in enumerate(rows))
    assert 10 < sum(row["gold"] for row in rows) < 30  # both places used
    assert rows == heldout_rows(pairs, range(40), seed=1)


def test_accuracy_equals_a_hand_count_under_the_pair_rules():
    pairs = [pair(f"q{i}", f"good {i}", f"bad {i}") for i in range(5)]
    pairs.append(pair("q5", "good 5", "bad 5", chosen_finished=False))  # truncated gold chosen
    rows = heldout_rows(pairs, range(6), seed=0)
    # reward of the gold response minus the other's: right on 0, 1, 3, 5 (5 by 0.5), wrong on 2, tied on 4
    gaps = [1.0, 2.0, -1.0, 0.5, 0.0, 0.5]
    judgments = []
    for row, gap in zip(rows, gaps):
        rewards = [0.0, 0.0]
        rewards[row["gold"]] = gap
        judgments.append({"prompt_id": row["prompt_id"], "rewards": rewards, "num_tokens": [3, 3]})
    keep = JudgeConfig(truncated="keep", length_penalty=0.0).rules
    tie_is_right = rows[4]["gold"] == 0  # the pick takes the first of equals
    result = signal_accuracy([(rows, judgments)], keep, seed=0)
    assert result["n"] == 6 and result["unpaired"] == 0
    assert result["accuracy"] == (4 + tie_is_right) / 6
    assert result["raw_accuracy"] == 4 / 6  # a tie is no win for the reward alone
    assert result["ci95_low"] <= result["accuracy"] <= result["ci95_high"]
    # penalize (1.0): the truncated gold chosen of pair 5 now loses (0.5 - 1.0 < 0)
    penalize = JudgeConfig(truncated="penalize", truncation_penalty=1.0, length_penalty=0.0).rules
    assert signal_accuracy([(rows, judgments)], penalize)["accuracy"] == (3 + tie_is_right) / 6
    # drop: pair 5's chosen cannot be truncated, so its finished rejected response is picked
    drop = JudgeConfig(truncated="drop", length_penalty=0.0).rules
    assert signal_accuracy([(rows, judgments)], drop)["accuracy"] == (3 + tie_is_right) / 6


def test_the_warning_comes_when_the_interval_reaches_down_to_half():
    strong = {"folds": 2, "labeller": "implicit", "accuracy": 0.8, "ci95_low": 0.62, "ci95_high": 0.95, "n": 20}
    chance = {**strong, "accuracy": 0.55, "ci95_low": 0.4, "ci95_high": 0.7}
    assert not weak(strong) and "not better than chance" not in signal_line(strong)
    assert weak(chance) and "not better than chance" in signal_line(chance)
    assert "80% [62%, 95%] of 20" in signal_line(strong)
    assert not weak({"skipped": "judge.signal_folds is 0"})


def write_run_inputs(directory: Path, seed_rows: list[dict], model: str, iterations: int = 0, **judge) -> Path:
    prompts = directory / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"write about {t}"}) + "\n" for t in TOPICS))
    seed = directory / "seed.jsonl"
    seed.write_text("".join(json.dumps(row) + "\n" for row in seed_rows))
    recipe = {
        "num_iterations": iterations,
        "model": {"name": model},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"prompts": str(prompts), "seed_pairs": str(seed), "seed_size": 0, "iteration_sizes": [4]},
        "judge": {"truncated": "keep", "length_penalty": 0.0, "signal_folds": 2, **judge},
        "train": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 3e-3, "seed_epochs": 2},
    }
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def seed_check(tmp_path: Path, tiny_model: str, seed_rows: list[dict], **recipe_args) -> tuple[dict, RunContext]:
    recipe = write_run_inputs(tmp_path, seed_rows, tiny_model, **recipe_args)
    config = load_recipe(recipe, ["--output_dir", str(tmp_path / "run")])
    run_loop(config)
    ctx = RunContext.load(tmp_path / "run")
    return ctx.read_metrics(0)["seed"]["label_signal"], ctx


def learnable_seed(n: int = 24) -> list[dict]:
    """One answer always chosen over another: a seed any labeller fitted on it should rank."""
    return [
        {"prompt": f"say something about {TOPICS[i % len(TOPICS)]} {i}", "chosen": "yes, thank you", "rejected": "no bad"}
        for i in range(n)
    ]


def test_a_learnable_seed_shows_its_signal_and_no_warning(tiny_model, tmp_path):
    signal, ctx = seed_check(tmp_path, tiny_model, learnable_seed())
    assert signal["n"] == 24 and signal["ci95_low"] > 0.5, signal
    assert "not better than chance" not in ctx.summary_file.read_text()
    assert [p.name for p in sorted((ctx.iteration_dir(0) / "signal").iterdir())] == ["fold_0.jsonl", "fold_1.jsonl"]


def test_a_seed_without_signal_reports_about_half_and_the_warning(tiny_model, tmp_path):
    """Every pair's two answers come from the same pool and its label from a coin: nothing to learn."""
    rng = random.Random(7)
    answers = ["yes, thank you", "no bad", "hello world", "maybe please", "good morning", "the sea and the sky"]
    rows = []
    for i in range(40):
        a, b = rng.sample(answers, 2)
        rows.append({"prompt": f"say something about {TOPICS[i % len(TOPICS)]} {i}", "chosen": a, "rejected": b})
    signal, ctx = seed_check(tmp_path, tiny_model, rows)
    assert signal["n"] == 40
    assert signal["ci95_low"] <= 0.5 <= signal["ci95_high"], signal
    assert "not better than chance (50%)" in ctx.summary_file.read_text()
    assert "not better than chance (50%)" in status_text(ctx.run_dir)
