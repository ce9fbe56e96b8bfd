"""Validation each iteration, the stop rule and the best iteration: the measures by hand, the checks, and the loop
on the tiny model stopping, resuming as stopped, continuing under --force and exporting the best iteration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from selfie.config.loader import load_recipe
from selfie.config.schema import ValidationConfig
from selfie.io import read_jsonl
from selfie.run.guard import best_iteration, failed_checks
from selfie.run.validation import SAMPLE, measures

from test_loop import STAGE_FILES, recipe_args, run_selfie, write_inputs, write_recipe

# ---- the measures and the checks, by hand


def _judged(margins: list[float]) -> tuple[list[dict], list[dict]]:
    """Held-out pair rows with the gold response first, and judgments whose reward margin (gold - other) is given."""
    rows = [{"prompt_id": f"seed-{i}", "gold": 0} for i in range(len(margins))]
    judgments = [{"prompt_id": f"seed-{i}", "rewards": [m, 0.0]} for i, m in enumerate(margins)]
    return rows, judgments


def _samples(tokens: list[int], finished: list[bool], log_ratios: list[float], prefix: str = SAMPLE):
    samples = [{"prompt_id": f"p{i}", "finished": [f]} for i, f in enumerate(finished)]
    judgments = [
        {"prompt_id": f"{prefix}p{i}", "num_tokens": [n], "policy_logps": [r - 5.0], "reference_logps": [-5.0]}
        for i, (n, r) in enumerate(zip(tokens, log_ratios))
    ]
    return samples, judgments


def test_validation_accuracy_loss_length_and_kl_are_the_formulas_by_hand():
    rows, judged = _judged([2.0, -1.0, 0.0, 0.5])
    samples, sample_judged = _samples([10, 20], [True, False], [0.3, 0.1])
    init = {"tokens": np.array([20.0, 20.0]), "truncated": np.array([0.0, 0.0])}
    m = measures(ValidationConfig(n_boot=200), rows, judged + sample_judged, samples, init, None, seed=0)
    assert m["accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)  # a tie counts half
    softplus = [math.log1p(math.exp(-x)) for x in (2.0, -1.0, 0.0, 0.5)]
    assert m["loss"] == pytest.approx(sum(softplus) / 4)  # -log sigmoid(margin)
    assert m["tokens_mean"] == 15 and m["init_tokens_mean"] == 20 and m["length_change"] == pytest.approx(-0.25)
    assert m["truncated"] == 0.5 and m["kl"] == pytest.approx(0.2)
    low, high = m["accuracy_ci95"]
    assert 0 <= low <= m["accuracy"] <= high <= 1
    _, previous = _judged([1.0, 1.0, 1.0, 1.0])
    change = measures(ValidationConfig(n_boot=200), rows, judged + sample_judged, samples, init, previous, seed=0)
    assert change["accuracy_change"] == pytest.approx(m["accuracy"] - 1.0)


def test_each_crossed_bound_is_one_named_reason_and_a_pass_is_none():
    rule = ValidationConfig(max_length_change=0.3, max_kl=2.0)
    fine = {"accuracy": 0.6, "accuracy_change": -0.05, "accuracy_change_ci95": [-0.2, 0.1], "length_change": 0.1, "kl": 1.0}
    assert failed_checks(rule, fine, None, None) == []
    worse = fine | {"accuracy_change": -0.3, "accuracy_change_ci95": [-0.5, -0.1]}
    shorter = fine | {"length_change": -0.4, "tokens_mean": 60, "init_tokens_mean": 100}
    drifted = fine | {"kl": 3.5}
    assert ["validation accuracy fell" in r for r in failed_checks(rule, worse, None, None)] == [True]
    assert ["-40%" in r and "max_length_change" in r for r in failed_checks(rule, shorter, None, None)] == [True]
    assert ["validation.max_kl" in r for r in failed_checks(rule, drifted, None, None)] == [True]
    assert failed_checks(ValidationConfig(max_length_change=None), shorter, None, None) == []
    lost = {"baseline": "previous", "win_rate": 0.3, "ci95": [0.2, 0.4]}
    assert ["prefers the previous iteration" in r for r in failed_checks(rule, fine, lost, None)] == [True]
    assert failed_checks(rule, fine, lost | {"ci95": [0.2, 0.55]}, None) == []
    fell = {"baseline": "init", "win_rate": 0.5, "ci95": [0.4, 0.6]}
    assert len(failed_checks(rule, fine, fell, {"baseline": "init", "win_rate": 0.7, "ci95": [0.6, 0.8]})) == 1


def test_the_best_iteration_has_the_highest_accuracy_among_those_that_passed():
    validated = {
        0: {"accuracy": 0.6, "loss": 0.6, "failed": []},
        1: {"accuracy": 0.8, "loss": 0.5, "failed": []},
        2: {"accuracy": 0.9, "loss": 0.4, "failed": ["responses average ..."]},
        3: {"accuracy": 0.8, "loss": 0.45, "failed": []},
    }
    assert best_iteration(validated) == 3  # ties on accuracy: the lower loss
    assert best_iteration({0: {"skipped": "no held-out pairs"}}) is None
    drift_only = {0: {"accuracy": None, "failed": []}, 1: {"accuracy": None, "failed": []}}
    assert best_iteration(drift_only) == 1


# ---- the loop


@pytest.fixture(scope="module")
def validated_recipe(tiny_model, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("validated")
    recipe = write_recipe(directory, tiny_model, *write_inputs(directory))
    values = yaml.safe_load(recipe.read_text())
    values["validation"] = {"pairs": 2, "n_boot": 200, "max_length_change": None}
    recipe.write_text(yaml.safe_dump(values))
    return recipe


@pytest.fixture(scope="module")
def unstopped(validated_recipe, tmp_path_factory) -> Path:
    """The run with no bound that can fail: every iteration validated."""
    run_dir = tmp_path_factory.mktemp("unstopped") / "run"
    run_selfie("run", *recipe_args(validated_recipe, run_dir))
    return run_dir


def validate_metrics(run_dir: Path, t: int) -> dict:
    return json.loads((run_dir / f"iter_{t:03d}" / "metrics.json").read_text())["validate"]


def test_every_iteration_is_validated_on_seed_pairs_no_training_saw(unstopped):
    held = read_jsonl(unstopped / "iter_000" / "validation_pairs.jsonl")
    trained = read_jsonl(unstopped / "iter_000" / "pairs.jsonl")
    assert len(held) == 2 and len(trained) == 6
    assert not {json.dumps(p, sort_keys=True) for p in held} & {json.dumps(p, sort_keys=True) for p in trained}
    for t in (0, 1, 2):
        v = validate_metrics(unstopped, t)
        assert v["pairs"] == 2 and v["prompts"] == 2
        assert v["loss"] > 0 and v["loss_ci95"][0] <= v["loss"] <= v["loss_ci95"][1]
        assert {"accuracy_ci95", "kl_ci95", "length_change", "truncated", "init_truncated", "best_iteration"} <= set(v)
        assert ("accuracy_change" in v) == (t > 0)
        assert v["failed"] == [] and v["stop"] is False
    manifest = json.loads((unstopped / "manifest.json").read_text())
    assert [(s["iteration"], s["stage"]) for s in manifest["stages"]][:3] == [(0, "seed"), (0, "validate"), (1, "generate")]
    summary = (unstopped / "summary.md").read_text()
    assert "| validation |" in summary and "acc " in summary and "best iteration (validation):" in summary
    status = run_selfie("status", str(unstopped)).stdout
    assert status.count("validation: accuracy") == 3 and "best  iter" in status
    last = sorted((unstopped / "wandb").glob("offline-run-*/run-*.wandb"))[-1].read_bytes()  # iteration 2's wandb run
    for key in (b"validate/accuracy", b"validate/loss", b"validate/length_change", b"validate/kl", b"validate/truncated"):
        assert key in last, key


def test_the_loop_stops_at_a_crossed_bound_stays_stopped_and_continues_under_force(validated_recipe, unstopped, tmp_path):
    kl = [validate_metrics(unstopped, t)["kl"] for t in (0, 1)]
    assert kl[1] > kl[0], kl  # iteration 1 trains further from pi_init than the seed adapter
    bound = str((kl[0] + kl[1]) / 2)  # passed by iteration 0, crossed by iteration 1
    run_dir = tmp_path / "run"
    first = run_selfie("run", *recipe_args(validated_recipe, run_dir, "--validation.max_kl", bound))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stopped"]["iteration"] == 1 and "validation.max_kl" in manifest["stopped"]["reason"]
    assert not (run_dir / "iter_002").exists()
    assert "stopped after iteration 1" in first.stderr and "stopped after iteration 1" in (run_dir / "summary.md").read_text()
    assert validate_metrics(run_dir, 1)["best_iteration"] == 0  # the failed iteration is never the best

    again = run_selfie("run", *recipe_args(validated_recipe, run_dir, "--validation.max_kl", bound))
    assert json.loads((run_dir / "manifest.json").read_text())["stages"] == manifest["stages"]  # finished: nothing ran
    assert "stopped after iteration 1" in again.stderr
    assert "stopped after iteration 1" in run_selfie("status", str(run_dir)).stdout
    dry = run_selfie("run", *recipe_args(validated_recipe, run_dir, "--validation.max_kl", bound, "--dry-run"))
    assert "stopped after iteration 1" in dry.stdout

    export = run_selfie("export", str(run_dir), "--output", str(tmp_path / "export"), "--adapter-only")
    assert "iteration 0: the best on validation" in export.stderr

    run_selfie("run", *recipe_args(validated_recipe, run_dir, "--validation.max_kl", "null", "--force"))  # bound lifted
    assert "stopped" not in json.loads((run_dir / "manifest.json").read_text())
    for name in STAGE_FILES:  # continued as the run that never stopped went on
        assert (run_dir / "iter_002" / name).read_bytes() == (unstopped / "iter_002" / name).read_bytes(), name


def test_validation_is_refused_before_compute_when_it_leaves_nothing_to_train(validated_recipe, tmp_path):
    run_dir = tmp_path / "run"
    result = run_selfie("run", *recipe_args(validated_recipe, run_dir, "--validation.pairs", "8", "--dry-run"), check=False)
    assert result.returncode == 2 and not run_dir.exists()
    assert "recipe key 'validation.pairs': 8 of 8 seed pairs holds out 8" in result.stderr
    plan = run_selfie("run", *recipe_args(validated_recipe, run_dir, "--dry-run")).stdout
    assert "validation 2 seed pairs held out of training" in plan and "on 6 seed pairs" in plan
    config = load_recipe(validated_recipe)
    assert config.validation.pairs == 2


def test_validation_added_to_a_run_whose_seed_held_nothing_out_reports_why_and_finishes(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model, *write_inputs(tmp_path))
    run_dir, one = tmp_path / "run", ("--num_iterations", "1", "--report_to", "[]")
    run_selfie("run", *recipe_args(recipe, run_dir, *one))
    run_selfie("run", *recipe_args(recipe, run_dir, *one, "--validation", "{pairs: 2}", "--force"))
    for t in (0, 1):
        assert "the seed stage held no pairs out" in validate_metrics(run_dir, t)["skipped"]
    assert "complete" in run_selfie("status", str(run_dir)).stdout
    assert not (run_dir / "iter_000" / "validation_pairs.jsonl").exists()
