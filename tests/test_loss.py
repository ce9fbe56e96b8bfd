"""The noise-aware DPO loss on its own (selfie/training/loss.py) against docs/METHOD.md section 1.7, by hand."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from selfie.training.loss import RefinementWindow, label_smoothing, noise_aware_dpo_loss, warmed_up

LOG2 = 0.6931471805599453  # -logsigmoid(0) = log 2
SOFTPLUS_MINUS_1 = 0.31326168751822286  # -logsigmoid(1) = log(1 + e^-1)
SOFTPLUS_1 = 1.3132616875182228  # -logsigmoid(-1) = log(1 + e)


def three_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen / rejected log-ratios with z = 2, -2, 0, so beta z = 1, -1, 0 at beta = 0.5."""
    chosen = torch.tensor([3.0, 0.5, 1.0], dtype=torch.float64)
    rejected = torch.tensor([1.0, 2.5, 1.0], dtype=torch.float64)
    return chosen, rejected


def test_losses_of_three_pairs_by_hand():
    chosen, rejected = three_pairs()
    margins = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)  # beta z, as without DND
    losses, parts = noise_aware_dpo_loss(chosen, rejected, margins, tau=0.5, alpha=0.2, beta=0.5)
    # pair 1 above tau: eps 0; pairs 2 and 3 below: eps 0.2
    # pair 2: -(1 - 0.2) logsigmoid(-1) - 0.2 logsigmoid(1) = 0.8 * log(1 + e) + 0.2 * log(1 + e^-1)
    # pair 3: z = 0, so either label costs log 2
    expected = [SOFTPLUS_MINUS_1, 0.8 * SOFTPLUS_1 + 0.2 * SOFTPLUS_MINUS_1, LOG2]
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)
    assert parts["eps"].tolist() == [0.0, 0.2, 0.2]
    assert parts["sigmoid"].tolist() == pytest.approx([SOFTPLUS_MINUS_1, SOFTPLUS_1, LOG2], abs=1e-12)
    assert parts["smoothing"].tolist() == pytest.approx([0.0, 0.2 * 0.5 * -2.0, 0.0], abs=1e-12)  # eps beta z


def test_alpha_zero_is_plain_sigmoid_dpo():
    torch.manual_seed(0)
    chosen, rejected, margins = torch.randn(8), torch.randn(8), torch.randn(8)
    losses, parts = noise_aware_dpo_loss(chosen, rejected, margins, tau=10.0, alpha=0.0, beta=0.1)
    assert torch.equal(losses, -F.logsigmoid(0.1 * (chosen - rejected)))
    assert not parts["eps"].any()


def test_loss_is_the_smoothed_label_form_of_method_1_7():
    torch.manual_seed(1)
    chosen, rejected = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    margins = torch.randn(16, dtype=torch.float64)
    losses, parts = noise_aware_dpo_loss(chosen, rejected, margins, tau=0.0, alpha=0.3, beta=0.7)
    x, eps = 0.7 * (chosen - rejected), parts["eps"]
    torch.testing.assert_close(losses, -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x), rtol=0, atol=1e-12)
    assert 0 < eps.count_nonzero() < len(eps)


def test_only_pairs_strictly_below_tau_are_smoothed():
    margins = torch.tensor([-1.0, 0.25, 0.5, 2.0])
    assert label_smoothing(margins, 0.5, 0.1, warm=True).tolist() == pytest.approx([0.1, 0.1, 0.0, 0.0])
    assert label_smoothing(margins, 0.5, 0.1, warm=True).dtype == margins.dtype


def test_no_smoothing_during_warmup():
    margins = torch.tensor([-1.0, 0.0, 1.0])
    assert not label_smoothing(margins, 5.0, 0.5, warm=False).any()
    chosen, rejected = three_pairs()
    losses, _ = noise_aware_dpo_loss(chosen, rejected, margins.double(), tau=5.0, alpha=0.5, beta=0.5, warm=False)
    assert losses.tolist() == pytest.approx([SOFTPLUS_MINUS_1, SOFTPLUS_1, LOG2], abs=1e-12)
    # warm-up: the first warmup_fraction of the steps (20% of 10 steps: steps 0 and 1)
    assert [warmed_up(step, 10, 0.2) for step in range(4)] == [False, False, True, True]
    assert warmed_up(0, 10, 0.0) and not warmed_up(9, 10, 1.0)


def test_smoothing_pulls_a_low_confidence_pair_less_hard():
    chosen = torch.tensor([0.0, 0.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.zeros(2, dtype=torch.float64)
    margins = torch.tensor([1.0, -1.0], dtype=torch.float64)  # the second pair is below tau
    losses, _ = noise_aware_dpo_loss(chosen, rejected, margins, tau=0.0, alpha=0.25, beta=2.0)
    losses.sum().backward()
    # d loss / d z at z = 0: -beta (1 - eps) sigmoid(0) + beta eps sigmoid(0) = -beta (1 - 2 eps) / 2
    assert chosen.grad.tolist() == pytest.approx([-1.0, -0.5], abs=1e-12)


def test_refinement_window_rolls_over_optimizer_steps():
    window = RefinementWindow(steps=3)
    window.add(0, [1.0, 2.0])
    window.add(0, [3.0])  # a second micro-batch of the same optimizer step
    assert window.quantile(0.5) == 2.0
    for step, value in ((1, 4.0), (2, 5.0), (3, 6.0)):
        window.add(step, [value])
    assert list(window.completed) == [[4.0], [5.0]] and window.current == [6.0]  # step 0 fell out
    assert window.quantile(0.0) == 4.0
    restored = RefinementWindow(steps=1)
    restored.load_state_dict(json.loads(json.dumps(window.state_dict())))
    assert restored.state_dict() == window.state_dict()
    single = RefinementWindow(steps=1)
    single.add(0, [1.0])
    single.add(1, [9.0])
    assert single.quantile(0.0) == 9.0  # W = 1: only the step in progress


def test_agreement_floors_eps_at_one_minus_agreement_cream_s_soft_label():
    chosen, rejected = three_pairs()
    margins = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    agreement = torch.tensor([1.0, 0.5, 0.75], dtype=torch.float64)
    losses, parts = noise_aware_dpo_loss(chosen, rejected, margins, tau=0.5, alpha=0.2, beta=0.5, agreement=agreement)
    assert parts["eps"].tolist() == [0.0, 0.5, 0.25]  # max(alpha [m < tau], 1 - C)
    # pair 2 at C = 0.5: C l(y_w, y_l) + (1 - C) l(y_l, y_w) = 0.5 log(1 + e) + 0.5 log(1 + e^-1)
    expected = [SOFTPLUS_MINUS_1, 0.5 * SOFTPLUS_1 + 0.5 * SOFTPLUS_MINUS_1, LOG2]
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)
    unsmoothed, _ = noise_aware_dpo_loss(chosen, rejected, margins, tau=0.5, alpha=0.0, beta=0.5, agreement=agreement, warm=False)
    cream = [c * -F.logsigmoid(0.5 * z) - (1 - c) * F.logsigmoid(-0.5 * z) for c, z in zip(agreement, chosen - rejected)]
    assert unsmoothed.tolist() == pytest.approx([v.item() for v in cream], abs=1e-12)  # from the first step on
