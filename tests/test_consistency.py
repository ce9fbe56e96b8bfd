"""The consistency labeller (judge.labeller: consistency): the labellers a run has already paid for judge together,
a pair's agreement between them gates it (min_agreement) or sets its soft label (refine.soft_agreement)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from test_signal import learnable_seed, write_run_inputs

from selfie.config.loader import load_recipe
from selfie.config.schema import JudgeConfig
from selfie.errors import SelfieError
from selfie.io import read_jsonl
from selfie.labelling.ensemble import mean_judgments
from selfie.labelling.pairs import select_pairs
from selfie.run.labellers import consistency_members
from selfie.run.loop import run_loop
from selfie.run.rundir import RunContext
from selfie.training.loss import noise_aware_dpo_loss


def test_a_pair_two_of_three_labellers_rank_alike_trains_on_the_soft_label_two_thirds():
    row = {"prompt_id": "p", "prompt": [{"role": "user", "content": "q"}], "responses": ["a", "b"], "finished": [True, True]}
    members = [[3.0, 0.0], [1.0, 0.5], [0.0, 0.5]]  # pi_{t-1}, a fold adapter, another: the third disagrees
    judged = mean_judgments([[{"prompt_id": "p", "rewards": m, "num_tokens": [1, 1]}] for m in members])
    (pair,), _ = select_pairs([row], judged, JudgeConfig(labeller="consistency", length_penalty=0.0).rules)
    assert pair["chosen"][0]["content"] == "a" and pair["agreement"] == pytest.approx(2 / 3)

    # the trainer's loss on that pair at a policy log-ratio gap h, beta 0.1, no smoothing window: by hand,
    # C * -log sigmoid(beta h) + (1 - C) * -log sigmoid(-beta h) (CREAM's consistency-weighted loss)
    h, beta, c = 2.0, 0.1, 2 / 3
    chosen = torch.tensor([h], dtype=torch.float64)
    loss, parts = noise_aware_dpo_loss(
        chosen,
        torch.zeros(1, dtype=torch.float64),
        torch.tensor([pair["margin"]], dtype=torch.float64),
        tau=0.0,
        alpha=0.0,
        beta=beta,
        agreement=torch.tensor([pair["agreement"]], dtype=torch.float64),
        warm=False,
    )
    by_hand = c * math.log1p(math.exp(-beta * h)) + (1 - c) * math.log1p(math.exp(beta * h))
    assert parts["eps"].item() == pytest.approx(1 / 3) and loss.item() == pytest.approx(by_hand, abs=1e-12)


def test_min_agreement_is_accepted_for_consistency_and_the_labeller_needs_the_checks_folds():
    assert load_recipe(None, {"judge": {"labeller": "consistency", "min_agreement": 1.0}}).judge.min_agreement == 1.0
    with pytest.raises(SelfieError, match=r"judge\.signal_folds.*fold adapters"):
        load_recipe(None, {"judge": {"labeller": "consistency", "signal_folds": 0}})


def test_a_run_keeps_the_checks_fold_adapters_and_labels_each_iteration_with_its_paid_for_labellers(tiny_model, tmp_path):
    recipe = write_run_inputs(tmp_path, learnable_seed(), tiny_model, iterations=2, labeller="consistency", min_agreement=0.6)
    values = yaml.safe_load(recipe.read_text())
    values["data"]["iteration_sizes"] = [4, 4]
    recipe.write_text(yaml.safe_dump(values))
    run_loop(load_recipe(recipe, ["--output_dir", str(tmp_path / "run")]))
    ctx = RunContext.load(tmp_path / "run")

    signal = ctx.read_metrics(0)["seed"]["label_signal"]
    assert signal["labeller"] == "consistency" and signal["n"] == 24 and signal["ci95_low"] > 0.5, signal
    folds = [ctx.fold_adapters / f"fold_{k}" / "adapter" for k in range(2)]
    assert all(path.is_dir() for path in folds)  # kept, where the check's own work is gone
    assert not (ctx.iteration_dir(0) / "signal" / "fold_0").exists()
    assert consistency_members(ctx, 1) == [ctx.adapter(0), *folds]
    assert consistency_members(ctx, 2) == [ctx.adapter(1), ctx.adapter(0), *folds]
    for t, count in ((1, 3), (2, 4)):
        members = [read_jsonl(ctx.member_judgments(t) / f"member_{m}.jsonl") for m in range(count)]
        judged = read_jsonl(ctx.judgments(t))
        assert [j["rewards"] for j in judged] == [j["rewards"] for j in mean_judgments(members)]
        pairs, metrics = read_jsonl(ctx.pairs(t)), ctx.read_metrics(t)["judge"]
        assert all(p["agreement"] >= 0.6 for p in pairs)
        assert metrics["members"] == count and metrics["pairs"] + sum(metrics["dropped"].values()) == 4
