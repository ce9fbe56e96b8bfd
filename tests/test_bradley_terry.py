"""The bradley-terry labeller: the fitted head against its formula, its features, and the loop with it."""

from __future__ import annotations

import json

import numpy as np
import torch
from test_signal import learnable_seed, seed_check

from selfie.io import read_jsonl
from selfie.labelling.bradley_terry import RewardHead, fit_bradley_terry, response_features
from selfie.models import load_policy


def objective_gradient(head: RewardHead, chosen: torch.Tensor, rejected: torch.Tensor, l2: float) -> np.ndarray:
    """d/dw of mean log(1 + exp(-w . d_i)) + l2/2 |w|^2, d_i the standardised difference, written out in numpy."""
    d = ((chosen - rejected) / head.std).numpy()
    w = head.weight.numpy()
    sigma = 1 / (1 + np.exp(d @ w))  # sigmoid(-w . d)
    return -(sigma[:, None] * d).mean(axis=0) + l2 * w


def test_the_head_is_the_minimum_of_the_regularised_bradley_terry_loss():
    g = torch.Generator().manual_seed(0)
    direction = torch.tensor([2.0, -1.0, 0.0, 0.0, 0.5], dtype=torch.float64)
    a, b = torch.randn(60, 5, generator=g, dtype=torch.float64), torch.randn(60, 5, generator=g, dtype=torch.float64)
    first = (a @ direction > b @ direction)[:, None]  # the preferred one of each pair by the hidden direction
    chosen, rejected = torch.where(first, a, b), torch.where(first, b, a)
    for l2 in (0.01, 1.0):
        head = fit_bradley_terry(chosen, rejected, l2)
        assert np.abs(objective_gradient(head, chosen, rejected, l2)).max() < 1e-7
        both = torch.cat([chosen, rejected])
        assert torch.allclose(head.mean, both.mean(0)) and torch.allclose(head.std, both.std(0, correction=0))
    # weakly regularised, the head ranks the pairs it was fitted on by the hidden direction
    head = fit_bradley_terry(chosen, rejected, 0.01)
    assert np.mean(np.array(head.rewards(chosen)) > np.array(head.rewards(rejected))) > 0.95
    cosine = torch.nn.functional.cosine_similarity(head.weight / head.std, direction, dim=0)
    assert cosine > 0.9


def test_a_saved_head_scores_as_the_fitted_one(tmp_path):
    chosen, rejected = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    head = fit_bradley_terry(chosen, rejected, 1.0)
    head.save(tmp_path / "head")
    assert RewardHead.load(tmp_path / "head").rewards(chosen) == head.rewards(chosen)


def test_features_do_not_depend_on_the_batch_and_an_empty_response_has_one(tiny_model):
    model, tokenizer = load_policy(tiny_model)
    prompts = [[{"role": "user", "content": "write about the sea"}], [{"role": "user", "content": "a fox"}]] * 2
    responses = ["hello world and the sky and more words", "", "yes", "good morning"]
    together = response_features(model, tokenizer, prompts, responses, batch_size=4)
    alone = torch.cat([response_features(model, tokenizer, [p], [r]) for p, r in zip(prompts, responses)])
    assert together.shape == (4, model.config.hidden_size) and torch.isfinite(together).all()
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(together[2], together[3])  # different responses, different features


def test_a_run_fits_the_head_in_the_seed_stage_and_labels_with_it(tiny_model, tmp_path):
    signal, ctx = seed_check(tmp_path, tiny_model, learnable_seed(), iterations=1, labeller="bradley-terry")
    assert signal["labeller"] == "bradley-terry" and signal["n"] == 24 and signal["ci95_low"] > 0.5, signal
    manifest = json.loads(ctx.manifest_file.read_text())
    seed_step = next(s for s in manifest["stages"] if s["stage"] == "seed")
    assert "iter_000/reward_head" in seed_step["artifacts"]
    # iteration 1's rewards are the seed stage's head applied to pi_init's features of its responses
    model, tokenizer = load_policy(tiny_model)
    head = RewardHead.load(ctx.reward_head)
    rows = {row["prompt_id"]: row for row in read_jsonl(ctx.responses(1))}
    judged = read_jsonl(ctx.judgments(1))
    expected = [
        head.rewards(response_features(model, tokenizer, [rows[j["prompt_id"]]["prompt"]] * 2, rows[j["prompt_id"]]["responses"]))
        for j in judged
    ]
    np.testing.assert_allclose([j["rewards"] for j in judged], expected, rtol=1e-4, atol=1e-6)
    assert ctx.read_metrics(1)["judge"]["labeller"] == "bradley-terry"
