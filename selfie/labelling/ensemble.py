"""An ensemble of seed adapters as one labeller (`judge.labeller: ensemble`, docs/METHOD.md 1.4).

Member m is a seed DPO adapter trained on a bootstrap resample of the seed pairs (n pairs drawn with replacement,
seeded by the run's seed and m). A response's reward is the members' mean implicit reward,

    r(x, y) = (1 / M) sum_m beta * (log pi_m(y|x) - log pi_init(y|x)),

and each judgment keeps the members' own rewards (`member_rewards`), from which the pair rules take a pair's
`agreement`: the share of members whose shaped scores rank its chosen response above its rejected one
(selfie/labelling/pairs.py; `judge.min_agreement` drops the pairs below it).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from selfie.errors import SelfieError


def bootstrap_resample(pairs: Sequence[dict], member: int, seed: int) -> list[dict]:
    """len(pairs) pairs drawn with replacement, the same for the same (member, seed)."""
    rng = random.Random(f"ensemble-{seed}-{member}")
    return [pairs[rng.randrange(len(pairs))] for _ in pairs]


def mean_judgments(members: Sequence[Sequence[dict]]) -> list[dict]:
    """One judgments row per prompt from each member's rows (the same prompts in the same order): the mean reward,
    the members' rewards, and the token counts (the same for every member: one tokenizer)."""
    combined = []
    for rows in zip(*members, strict=True):
        if len({row["prompt_id"] for row in rows}) != 1:
            raise SelfieError(f"ensemble: the members judged different prompts ({[row['prompt_id'] for row in rows]})")
        member_rewards = [row["rewards"] for row in rows]
        combined.append(
            {
                "prompt_id": rows[0]["prompt_id"],
                "rewards": [sum(values) / len(values) for values in zip(*member_rewards)],
                "member_rewards": member_rewards,
                "num_tokens": rows[0]["num_tokens"],
            }
        )
    return combined
