"""The seed training chosen by the label-signal check (train.seed_candidates)."""

from __future__ import annotations

import json

import pytest
import yaml
from test_signal import learnable_seed, write_run_inputs

from selfie.config.loader import load_recipe
from selfie.errors import SelfieError
from selfie.run.loop import run_loop
from selfie.run.rundir import RunContext
from selfie.run.seed_choice import candidate_config

# at the recipe's own learning rate the adapter stays below float32's resolution of the log-probabilities (every
# held-out pair a tie); the first candidate learns, on two modules
CANDIDATES = [{"learning_rate": 3e-3, "target_modules": ["q_proj", "v_proj"]}, {"learning_rate": 1e-12}]


def choice_run(directory, tiny_model) -> RunContext:
    recipe = write_run_inputs(directory, learnable_seed(), tiny_model)
    values = yaml.safe_load(recipe.read_text())
    values["train"] |= {"learning_rate": 1e-12, "seed_candidates": CANDIDATES}
    recipe.write_text(yaml.safe_dump(values))
    run_loop(load_recipe(recipe, ["--output_dir", str(directory / "run")]))
    return RunContext.load(directory / "run")


def test_the_check_picks_the_candidate_that_ranks_held_out_pairs_best_and_trains_the_seed_with_it(tiny_model, tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    ctx, again = (choice_run(tmp_path / name, tiny_model) for name in ("a", "b"))  # the same recipe twice
    choice, signal = ctx.read_metrics(0)["seed"]["seed_choice"], ctx.read_metrics(0)["seed"]["label_signal"]
    accuracies = [c["label_signal"]["accuracy"] for c in choice["candidates"]]
    assert choice["chosen"] == 1 and accuracies[1] == max(accuracies) and accuracies[1] > accuracies[0], accuracies
    assert [c["settings"] for c in choice["candidates"]] == [{}, *CANDIDATES]
    assert signal == choice["candidates"][1]["label_signal"]  # the run's label signal is the chosen candidate's
    adapter_config = json.loads((ctx.adapter(0) / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]
    summary = ctx.summary_file.read_text()
    assert "seed candidate 1 (learning_rate 0.003, target_modules ['q_proj', 'v_proj']): " in summary
    assert summary.count("<- chosen") == 1
    rerun = again.read_metrics(0)["seed"]["seed_choice"]
    assert rerun["chosen"] == 1 and [c["label_signal"]["accuracy"] for c in rerun["candidates"]] == accuracies


def test_a_candidate_is_the_recipe_with_its_settings_and_bad_ones_are_refused_naming_the_key():
    config = candidate_config(load_recipe(None, {}), CANDIDATES[0])
    assert (config.train.learning_rate, config.lora.target_modules) == (3e-3, ["q_proj", "v_proj"])
    with pytest.raises(SelfieError, match=r"train\.seed_candidates.*learning_rate"):
        load_recipe(None, {"train": {"seed_candidates": [{"lr": 1e-3}]}})
    with pytest.raises(SelfieError, match=r"train\.seed_candidates.*judge\.signal_folds"):
        load_recipe(None, {"train": {"seed_candidates": [{"seed_epochs": 1}]}, "judge": {"signal_folds": 0}})
