"""Pair making: truncation policies, length penalty (fixed and auto), drop reasons, diagnostics, replay."""

from __future__ import annotations

import pytest

from selfie.config.loader import load_recipe
from selfie.config.schema import JudgeConfig, PairRules
from selfie.errors import SelfieError
from selfie.labelling.pairs import auto_length_penalty, select_pairs, with_replay


def rules(truncated: str = "drop", **values) -> PairRules:
    """Pairing rules; unless a test names them, the plain ones: truncated responses dropped, no length penalty."""
    return JudgeConfig(truncated=truncated, **{"length_penalty": 0.0, **values}).rules


def row(pid, texts, finished):
    return {"prompt_id": pid, "prompt": [{"role": "user", "content": "q"}], "responses": texts, "finished": finished}


def judged(rewards, tokens):
    return {"rewards": rewards, "num_tokens": tokens}


def texts(pair):
    return pair["chosen"][0]["content"], pair["rejected"][0]["content"]


def test_drop_rule_and_drop_counts():
    rows = [
        row("top-truncated", ["x", "y", "z"], [False, True, True]),
        row("all-truncated", ["x", "y"], [False, False]),
        row("identical", ["same", "same"], [True, True]),
        row("dup-of-chosen", ["a", "a", "b"], [True, True, True]),
        row("single", ["only"], [True]),
    ]
    judgments = [
        judged([5.0, 1.0, -2.0], [3, 3, 3]),
        judged([1.0, 0.0], [1, 1]),
        judged([0.3, 0.3], [1, 1]),
        judged([2.0, 2.0, 1.0], [1, 1, 1]),
        judged([0.0], [1]),
    ]
    pairs, metrics = select_pairs(rows, judgments, rules())
    assert metrics["dropped"] == {
        "all_truncated": 1,
        "identical": 1,
        "single_response": 1,
        "unjudged": 0,
        "anchor_preferred": 0,
        "low_margin": 0,
        "disagreement": 0,
    }
    first, dup = pairs
    assert texts(first) == ("y", "z") and first["margin"] == 3.0
    assert texts(dup) == ("a", "b")
    assert first["chosen"] == [{"role": "assistant", "content": "y"}]
    assert (first["chosen_finished"], first["rejected_finished"]) == (True, True)
    # only the first pair's chosen differs from what the scores alone would pick
    assert metrics["decided_by_truncation"] == 0.5 and metrics["negative_margin"] == 0


def test_margin_quantile_drops_the_least_confident_pairs_by_shaped_margin():
    rows = [row(f"p{i}", ["a", "b"], [True, True]) for i in range(4)]
    judgments = [judged([4.0, 0.0], [1, 1]), judged([1.0, 0.0], [1, 1]), judged([0.5, 0.0], [1, 1]), judged([3.0, 0.0], [1, 1])]
    kept, metrics = select_pairs(rows, judgments, rules(min_margin_quantile=0.5))
    # the median of (4, 1, 0.5, 3) is 2: the pairs with margins 1 and 0.5 go
    assert [p["prompt_id"] for p in kept] == ["p0", "p3"] and metrics["dropped"]["low_margin"] == 2
    everything, metrics = select_pairs(rows, judgments, rules())
    assert len(everything) == 4 and metrics["dropped"]["low_margin"] == 0


def test_margin_quantile_ranks_by_the_margin_after_the_length_penalty():
    rows = [row("long", ["a", "b"], [True, True]), row("short", ["c", "d"], [True, True])]
    # raw margins 3 and 2; with alpha 1 the long pair's chosen is 2 tokens longer: shaped 3 - 2 = 1 < 2
    judgments = [judged([3.0, 0.0], [3, 1]), judged([2.0, 0.0], [1, 1])]
    kept, _ = select_pairs(rows, judgments, rules(length_penalty=1.0, min_margin_quantile=0.5))
    assert [p["prompt_id"] for p in kept] == ["short"]


def test_keep_and_penalize_let_a_truncated_response_compete():
    rows = [row("p", ["long cut", "short done"], [False, True])]
    judgments = [judged([1.0, 0.2], [10, 4])]
    drop, _ = select_pairs(rows, judgments, rules("drop"))
    keep, _ = select_pairs(rows, judgments, rules("keep"))
    mild, _ = select_pairs(rows, judgments, rules("penalize", truncation_penalty=0.5))
    harsh, _ = select_pairs(rows, judgments, rules("penalize", truncation_penalty=1.0))
    assert texts(drop[0]) == texts(harsh[0]) == ("short done", "long cut")
    assert drop[0]["margin"] == pytest.approx(-0.8)  # the raw reward margin, negative when the rule decided
    assert texts(keep[0]) == texts(mild[0]) == ("long cut", "short done")
    assert keep[0]["chosen_finished"] is False and keep[0]["chosen_tokens"] == 10


def test_fixed_length_penalty_shifts_the_choice():
    rows = [row("p", ["long", "short"], [True, True])]
    judgments = [judged([1.0, 0.5], [20, 5])]
    assert texts(select_pairs(rows, judgments, rules(length_penalty=0.0))[0][0]) == ("long", "short")
    pairs, metrics = select_pairs(rows, judgments, rules(length_penalty=0.05))  # 1 - 1.0 < 0.5 - 0.25
    assert texts(pairs[0]) == ("short", "long") and metrics["length_penalty"] == 0.05
    assert pairs[0]["margin"] == -0.5


def test_auto_length_penalty_equalises_mean_lengths():
    # Longer responses score higher by construction: without a penalty every chosen is the longer one.
    rows, judgments = [], []
    for i in range(40):
        short, long = 5 + i % 7, 15 + (3 * i) % 11
        rows.append(row(f"p{i}", ["a", "b"], [True, True]))
        judgments.append(judged([0.02 * long + 0.01 * (i % 5), 0.02 * short + 0.03 * (i % 3)], [long, short]))
    _, plain = select_pairs(rows, judgments, rules())
    assert plain["chosen_tokens_mean"] - plain["rejected_tokens_mean"] > 8
    pairs, metrics = select_pairs(rows, judgments, rules(length_penalty="auto"))
    alpha = metrics["length_penalty"]
    assert alpha > 0 and alpha == auto_length_penalty(rows, judgments, rules(length_penalty="auto"))
    gap = metrics["chosen_tokens_mean"] - metrics["rejected_tokens_mean"]
    # as near zero as the data allows: no alpha on a fine grid does better
    best = min(
        abs(m["chosen_tokens_mean"] - m["rejected_tokens_mean"])
        for a in [k * 1e-4 for k in range(0, 2000)]
        for m in [select_pairs(rows, judgments, rules(length_penalty=a))[1]]
    )
    assert abs(gap) <= best + 1e-9 and abs(gap) < 1.0


def test_auto_length_penalty_can_reward_length_when_chosen_are_shorter():
    rows = [row(f"p{i}", ["a", "b"], [True, True]) for i in range(10)]
    judgments = [judged([0.5 + 0.01 * i, 0.1 + 0.02 * i], [4, 12 + i]) for i in range(10)]
    pairs, metrics = select_pairs(rows, judgments, rules(length_penalty="auto"))
    assert metrics["length_penalty"] < 0
    assert abs(metrics["chosen_tokens_mean"] - metrics["rejected_tokens_mean"]) < 1.0


def test_auto_length_penalty_stays_finite_when_no_alpha_closes_the_gap():
    # Under drop the finished (shorter) response is always chosen: the gap cannot reach zero.
    rows = [row(f"p{i}", ["short done", "long cut"], [True, False]) for i in range(5)]
    rows.append(row("free", ["a", "b"], [True, True]))
    judgments = [judged([0.1, 0.5], [5, 20]) for _ in range(5)] + [judged([0.3, 0.1], [4, 30])]
    pairs, metrics = select_pairs(rows, judgments, rules("drop", length_penalty="auto"))
    alpha = metrics["length_penalty"]
    # the free prompt flips to its longer response once -alpha * 26 > 0.2: the smallest such |alpha|, finite
    assert alpha == pytest.approx(-0.2 / 26, rel=1e-3) and texts(pairs[-1]) == ("b", "a")


def test_bad_rules_are_refused_naming_the_key():
    with pytest.raises(SelfieError, match="recipe key 'judge.truncated': expected one of drop, penalize, keep"):
        rules("sometimes")
    with pytest.raises(SelfieError, match="recipe key 'judge.length_penalty': expected a number or 'auto'"):
        rules(length_penalty="often")


def test_a_python_caller_gets_the_recipes_rules():
    # a truncated response scoring highest: drop never chooses it, penalize (the recipe's default) lets it
    # compete less a penalty of 1.0, keep takes it; auto (the default alpha) equalises lengths
    rows = [row("p", ["cut but best", "done", "worst"], [False, True, True])]
    judgments = [judged([1.6, 0.2, 0.0], [10, 10, 10])]
    recipe = load_recipe(None).judge
    assert (recipe.truncated, recipe.length_penalty) == ("penalize", "auto")
    default = select_pairs(rows, judgments)
    assert default == select_pairs(rows, judgments, recipe.rules)
    assert texts(default[0][0]) == ("cut but best", "worst")
    assert default != select_pairs(rows, judgments, rules("drop"))


def test_replay_draws_the_stated_fraction_reproducibly():
    new = [{"prompt_id": f"n{i}"} for i in range(30)]
    seed = [{"prompt_id": f"s{i}"} for i in range(50)]
    mixed = with_replay(new, seed, 0.25, seed=7)
    replayed = [p for p in mixed if p.get("replay")]
    assert len(mixed) == 40 and len(replayed) == 10  # 10 of 40 = 25%
    assert len({p["prompt_id"] for p in replayed}) == 10 and all(p["prompt_id"].startswith("s") for p in replayed)
    assert with_replay(new, seed, 0.25, seed=7) == mixed
    assert with_replay(new, seed, 0.25, seed=8) != mixed
    assert with_replay(new, seed, 0.0, seed=7) == new
    many = with_replay(new, seed[:4], 0.5, seed=1)  # 30 replayed from 4 seed pairs: every seed pair drawn
    assert sum(bool(p.get("replay")) for p in many) == 30
    with pytest.raises(SelfieError, match="data.replay"):
        with_replay(new, seed, 1.0, seed=0)


def test_a_pairwise_judges_two_orders_give_the_agreement_and_an_unreadable_verdict_no_pair():
    rows = [row("agree", ["a", "b"], [True, True]), row("split", ["c", "d"], [True, True]), row("nan", ["e", "f"], [True, True])]
    judgments = [  # each order's P(response beats the other), as selfie/evaluation/remote_judges.py::LLMPairJudge gives
        {**judged([0.8, 0.2], [1, 1]), "member_rewards": [[0.9, 0.1], [0.7, 0.3]]},
        {**judged([0.6, 0.4], [1, 1]), "member_rewards": [[1.0, 0.0], [0.2, 0.8]]},  # position bias: each order its first
        {**judged([float("nan")] * 2, [1, 1]), "member_rewards": [[float("nan")] * 2] * 2},
    ]
    labeller = "llm-pair:http://127.0.0.1:8000/v1?model=judge"
    pairs, metrics = select_pairs(rows, judgments, JudgeConfig(labeller=labeller, length_penalty=0.0).rules)
    assert [(p["prompt_id"], p["agreement"]) for p in pairs] == [("agree", 1.0), ("split", 0.5)]
    assert metrics["dropped"]["unjudged"] == 1
    strict = JudgeConfig(labeller=labeller, length_penalty=0.0, min_agreement=1.0).rules
    kept, metrics = select_pairs(rows, judgments, strict)
    assert [p["prompt_id"] for p in kept] == ["agree"] and metrics["dropped"]["disagreement"] == 1
