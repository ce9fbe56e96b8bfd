"""A Bradley-Terry reward head on pi_init's frozen hidden states (`judge.labeller: bradley-terry`, docs/METHOD.md 1.4).

phi(x, y) is pi_init's last decoder layer output averaged over the positions that predict or hold the response
(the prompt's last token and the response's tokens, so an empty response has a feature too), standardised by
the seed responses' mean and standard deviation: z = (phi - mu) / sd. The reward is linear, r(x, y) = w . z,
fitted on the seed pairs as a Bradley-Terry model, P(chosen > rejected) = sigmoid(r_chosen - r_rejected), by
L2-regularised logistic regression on the difference with no bias (convex: one solution, found by L-BFGS):

    w = argmin_w  mean_i log(1 + exp(-w . (z_chosen,i - z_rejected,i)))  +  (l2 / 2) ||w||^2

A self-derived explicit reward (Lin et al. find an explicit reward model fitted on the pairs generalises better
than DPO's implicit one): one forward pass of pi_init per response to fit or apply, no training of the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfie.hidden import Encoded, collect_states, decoder_layers, encode
from selfie.io import atomic_directory
from selfie.tokens import pad_token_id

HEAD_FILE = "head.safetensors"
STD_FLOOR = 1e-6  # a feature constant over the seed responses is left unscaled rather than divided by ~0


def response_features(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[dict]],
    responses: Sequence[str],
    batch_size: int = 8,
) -> torch.Tensor:
    """phi of each (prompt, response): [N, hidden] float64 on the CPU. The response's span is widened by one to the
    prompt's last position (the one that predicts its first token), so collect_states' mean over it is never empty."""
    items = [encode(tokenizer, prompt, response) for prompt, response in zip(prompts, responses)]
    widened = [Encoded(item.ids, item.prompt_len - 1) for item in items]
    last = len(decoder_layers(model)) - 1
    states = collect_states(model, widened, pad_token_id(tokenizer), layers=[last], mode="mean", batch_size=batch_size)
    return states[:, 0].double()


@dataclass
class RewardHead:
    """r = w . (phi - mean) / std."""

    weight: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def rewards(self, features: torch.Tensor) -> list[float]:
        return (((features - self.mean) / self.std) @ self.weight).tolist()

    def save(self, directory: Path) -> None:
        with atomic_directory(directory) as tmp:
            save_file({"weight": self.weight, "mean": self.mean, "std": self.std}, tmp / HEAD_FILE)

    @classmethod
    def load(cls, directory: Path) -> RewardHead:
        return cls(**load_file(directory / HEAD_FILE))


def fit_bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, l2: float, max_iter: int = 500) -> RewardHead:
    """The head minimising the regularised Bradley-Terry loss above on pairs of features ([N, hidden] each)."""
    both = torch.cat([chosen, rejected])
    mean, std = both.mean(dim=0), both.std(dim=0, correction=0).clamp_min(STD_FLOOR)
    diff = (chosen - rejected) / std
    weight = torch.zeros(diff.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight], max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.softplus(-(diff @ weight)).mean() + l2 / 2 * weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    return RewardHead(weight.detach(), mean, std)


def fit_on_pairs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[dict], l2: float) -> RewardHead:
    """The head fitted on preference pairs (pairs.jsonl rows: prompt, chosen, rejected)."""
    prompts = [pair["prompt"] for pair in pairs]
    texts = [pair[side][-1]["content"] for side in ("chosen", "rejected") for pair in pairs]
    features = response_features(model, tokenizer, prompts + prompts, texts)
    return fit_bradley_terry(features[: len(pairs)], features[len(pairs) :], l2)


class BradleyTerryJudge:
    """The head as a judge (selfie/evaluation/judges.py's protocol): one reward per (prompt, response)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, head: RewardHead):
        self.model, self.tokenizer, self.head = model, tokenizer, head

    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        return self.head.rewards(response_features(self.model, self.tokenizer, prompts, responses))
