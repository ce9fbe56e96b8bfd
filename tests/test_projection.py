"""The vocabulary projection shared by the judge and the trainer: tiled, it gives log_softmax's values."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import selfie.projection as projection
from selfie.errors import SelfieError
from selfie.models import load_model


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("weights", [(1.0,), (1.5, -0.5), (0.5, 0.25)])
def test_tiled_projection_equals_log_softmax(monkeypatch, bias, softcap, weights):
    """Several position blocks and vocabulary tiles (the last one ragged) give log_softmax's values, for a model's own
    logits (one term), for DND's extrapolation (1 + lambda) h_policy - lambda h_reference (two terms, lambda 0.5) and
    for weights that do not sum to 1 (uncapped terms are mixed before one projection: the bias must scale with them)."""
    monkeypatch.setattr(projection, "PROJECTION_ELEMENTS", 7 * 13)
    monkeypatch.setattr(projection, "POSITION_BLOCK", 7)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=bias)
    policy, reference, targets = torch.randn(23, 16) * 4, torch.randn(23, 16) * 4, torch.randint(0, 300, (23,))
    terms = list(zip(weights, (policy, reference)))

    def capped(h: torch.Tensor) -> torch.Tensor:
        logits = head(h).double()
        return softcap * torch.tanh(logits / softcap) if softcap else logits

    mixed = sum(c * capped(h) for c, h in terms)
    expected = torch.log_softmax(mixed, -1).gather(1, targets.unsqueeze(1)).squeeze(1)
    with torch.no_grad():
        got = projection.token_logps(terms, targets, head.weight, head.bias, softcap)
    assert torch.allclose(got.double(), expected, atol=1e-5)


def test_softcap_is_read_from_the_text_config_through_a_peft_wrapper(tiny_model):
    model = load_model(tiny_model)
    assert projection.logit_softcap(model) is None
    model.config.final_logit_softcapping = 30.0
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert projection.logit_softcap(wrapped) == 30.0


def test_projection_refuses_a_wrapped_output_layer(tiny_model):
    wrapped = get_peft_model(load_model(tiny_model), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(SelfieError, match="plain Linear"):
        projection.output_layer(wrapped)
    assert projection.output_layer(load_model(tiny_model)) is not None
