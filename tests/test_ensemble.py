"""The ensemble labeller: bootstrap members, the mean reward, the agreement rule, and the loop with it."""

from __future__ import annotations

import json

import pytest
from test_signal import learnable_seed, seed_check

from selfie.config.loader import load_recipe
from selfie.config.schema import JudgeConfig
from selfie.errors import SelfieError
from selfie.io import read_jsonl
from selfie.labelling.ensemble import bootstrap_resample, mean_judgments
from selfie.labelling.pairs import select_pairs


def test_members_resample_the_seed_with_replacement_reproducibly():
    pairs = [{"i": i} for i in range(30)]
    first = bootstrap_resample(pairs, 0, seed=3)
    assert len(first) == 30 and first == bootstrap_resample(pairs, 0, seed=3)
    assert len({row["i"] for row in first}) < 30  # with replacement: some pairs twice, some not at all
    assert first != bootstrap_resample(pairs, 1, seed=3)


def test_the_ensemble_reward_is_the_members_mean_and_keeps_theirs():
    a = [{"prompt_id": "p", "rewards": [1.0, 0.0], "num_tokens": [2, 3], "policy_logps": [0, 0]}]
    b = [{"prompt_id": "p", "rewards": [3.0, -2.0], "num_tokens": [2, 3], "policy_logps": [0, 0]}]
    assert mean_judgments([a, b]) == [
        {"prompt_id": "p", "rewards": [2.0, -1.0], "member_rewards": [[1.0, 0.0], [3.0, -2.0]], "num_tokens": [2, 3]}
    ]
    with pytest.raises(SelfieError, match="different prompts"):
        mean_judgments([a, [{**b[0], "prompt_id": "q"}]])


def row(pid):
    return {"prompt_id": pid, "prompt": [{"role": "user", "content": "q"}], "responses": ["a", "b"], "finished": [True, True]}


def test_agreement_is_the_share_of_members_ranking_the_pair_alike_and_min_agreement_drops_below_it():
    rows = [row("unanimous"), row("split")]
    members = [[[2.0, 0.0], [1.0, 0.0], [3.0, 1.0]], [[2.0, 0.0], [-1.0, 0.0], [1.0, 0.5]]]  # per prompt, per member
    judgments = mean_judgments(
        [[{"prompt_id": r["prompt_id"], "rewards": m[k], "num_tokens": [1, 1]} for r, m in zip(rows, members)] for k in range(3)]
    )
    rules = JudgeConfig(labeller="ensemble", length_penalty=0.0)
    pairs, _ = select_pairs(rows, judgments, rules.rules)
    assert [p["agreement"] for p in pairs] == [1.0, pytest.approx(2 / 3)]
    kept, metrics = select_pairs(rows, judgments, JudgeConfig(labeller="ensemble", length_penalty=0.0, min_agreement=0.9).rules)
    assert [p["prompt_id"] for p in kept] == ["unanimous"] and metrics["dropped"]["disagreement"] == 1


def test_min_agreement_without_an_ensemble_is_refused_naming_the_keys():
    with pytest.raises(SelfieError, match=r"judge\.min_agreement.*judge\.labeller"):
        load_recipe(None, {"judge": {"min_agreement": 0.5}})


def test_a_run_trains_the_members_in_the_seed_stage_and_labels_with_their_mean(tiny_model, tmp_path):
    signal, ctx = seed_check(tmp_path, tiny_model, learnable_seed(), iterations=1, labeller="ensemble", ensemble_size=2)
    assert signal["labeller"] == "ensemble" and signal["n"] == 24 and signal["ci95_low"] > 0.5, signal
    assert sorted(p.name for p in ctx.ensemble.iterdir()) == ["member_0", "member_1"]
    assert not (ctx.iteration_dir(0) / "signal" / "fold_0").exists()  # the folds' members go once judged
    seed_step = json.loads(ctx.manifest_file.read_text())["stages"][0]
    assert seed_step["checksums"]["iter_000/ensemble"]["weight_files"] == 2
    members = [read_jsonl(ctx.member_judgments(1) / f"member_{m}.jsonl") for m in range(2)]
    judged = read_jsonl(ctx.judgments(1))
    assert [j["rewards"] for j in judged] == [j["rewards"] for j in mean_judgments(members)]
    assert all(0 <= p["agreement"] <= 1 for p in read_jsonl(ctx.pairs(1)))
