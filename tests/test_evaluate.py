"""Judges, win rates, judge accuracy, gold labelling and reports on tiny models and synthetic data."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from selfie.cli.main import main
from selfie.config.loader import dump_recipe, load_recipe
from selfie.config.schema import EvalOptions, JudgeConfig, LoraConfig
from selfie.errors import SelfieError
from selfie.evaluation.compare import compare_models
from selfie.evaluation.judges import load_judge
from selfie.evaluation.labels import judge_accuracy, pair_agreement, score_responses
from selfie.evaluation.report import write_report
from selfie.labelling.pairs import select_pairs
from selfie.models import attach_lora, load_model, load_tokenizer, save_adapter
from selfie.run.evaluation import INIT, run_scores
from selfie.run.rundir import RunContext
from selfie.stats import length_adjusted, win_rate

from tiny import build_tiny_reward_model, build_tokenizer

PROMPTS = [[{"role": "user", "content": "write a short poem about the sea"}], [{"role": "user", "content": "list three fruits"}]]


@pytest.fixture
def length_judge(tmp_path, monkeypatch):
    """A callable judge from a module on sys.path: the score is the response length in characters."""
    (tmp_path / "my_judges.py").write_text(
        textwrap.dedent("""
        def length(prompt, response):
            assert isinstance(prompt, list) and prompt[0]["role"] == "user"
            return len(response)

        def broken(prompt, response):
            return "high"

        def raises(prompt, response):
            if len(response) > 5:
                raise KeyError("score")
            return 0.0
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return load_judge("callable:my_judges:length")


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny model with non-zero weights, so policy and reference differ."""
    model = attach_lora(load_model(tiny_model, "float32"), LoraConfig(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(model, path)
    return path


def test_callable_judge_scores(length_judge):
    assert length_judge.score(PROMPTS, ["abc", ""]) == [3.0, 0.0]


def test_callable_judge_rejects_a_non_number(length_judge):
    judge = load_judge("callable:my_judges:broken")
    with pytest.raises(SelfieError, match="callable:my_judges:broken.*row 0"):
        judge.score(PROMPTS[:1], ["x"])


def test_a_judge_that_raises_is_one_line_naming_the_spec_and_the_row(length_judge, tmp_path, capsys):
    with pytest.raises(
        SelfieError,
        match=r"judge 'callable:my_judges:raises' raised KeyError: 'score' on row 1 "
        r"\(prompt 'list three fruits', response 'too long'\)",
    ):
        load_judge("callable:my_judges:raises").score(PROMPTS, ["ok", "too long"])
    code = main(
        [
            "eval",
            "accuracy",
            "--judge",
            "callable:my_judges:raises",
            "--preferences",
            "demo-seed",
            "--output",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 2 and err.count("\n") == 1 and err.startswith("selfie: error: judge 'callable:my_judges:raises' raised KeyError")
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "spec",
    [
        "nonsense",
        "gpt4:judge",
        "callable:",
        "callable:no_such_module_xyz:f",
        "callable:json:no_such_function",
        "implicit:",
        "implicit:MODEL@ADAPTER?gamma=1",
        "implicit:MODEL?beta=abc",
        "implicit:MODEL?beta=-1",
        "reward-model:/no/such/reward/model",
    ],
)
def test_bad_specs_name_the_spec(spec):
    with pytest.raises(SelfieError) as err:
        load_judge(spec)
    assert spec in str(err.value)


@pytest.mark.parametrize("chat_template", [True, False])
def test_reward_model_judge_matches_unbatched_forward(tmp_path, chat_template):
    path = build_tiny_reward_model(tmp_path / "rm", chat_template)
    judge = load_judge(f"reward-model:{path}", dtype="float32")
    prompts = PROMPTS + [PROMPTS[0]]
    responses = ["the sea is blue and the sky", "apple", "hello world, thank you please"]
    scores = judge.score(prompts, responses)  # one padded batch

    model = LlamaForSequenceClassification.from_pretrained(path).eval()
    tokenizer = build_tokenizer()
    for prompt, response, score in zip(prompts, responses, scores):
        if chat_template:
            text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
            assert text.startswith("<|im_start|>user\n")
        else:
            text = prompt[0]["content"] + "\n\n" + response
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            expected = model(input_ids=ids).logits[0, 0].item()
        assert score == pytest.approx(expected, abs=1e-4)
    assert len(set(scores)) == 3


def test_reward_model_needs_one_label(tmp_path):
    path = build_tiny_reward_model(tmp_path / "rm", num_labels=2)
    with pytest.raises(SelfieError, match="num_labels=1"):
        load_judge(f"reward-model:{path}")


def hand_logp(model: LlamaForCausalLM, tokenizer, prompt: list[dict], response: str) -> float:
    """Summed log-prob of the response tokens and its <|im_end|> under `model`, by plain full-sequence forward."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt_ids, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    targets = ids[0, 1:]
    token_logps = logps[torch.arange(len(targets)), targets][len(prompt_ids) - 1 :]
    assert len(token_logps) == len(response_ids)
    return token_logps.sum().item()


def test_implicit_judge_equals_hand_computation(tiny_model, adapter):
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    responses = ["the sea is blue", "apple, banana, cherry", "good"]
    scores = load_judge(f"implicit:{tiny_model}@{adapter}", dtype="float32").score(prompts, responses)
    scores_b2 = load_judge(f"implicit:{tiny_model}@{adapter}?beta=0.2", dtype="float32").score(prompts, responses)

    tokenizer = build_tokenizer()
    reference = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    policy = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model), str(adapter)).merge_and_unload().eval()
    for prompt, response, score, score_b2 in zip(prompts, responses, scores, scores_b2):
        diff = hand_logp(policy, tokenizer, prompt, response) - hand_logp(reference, tokenizer, prompt, response)
        assert abs(diff) > 1e-2  # the adapter matters
        assert score == pytest.approx(0.1 * diff, abs=1e-4)
        assert score_b2 == pytest.approx(0.2 * diff, abs=2e-4)


def test_implicit_judge_without_adapter_is_beta_logp(tiny_model):
    score = load_judge(f"implicit:{tiny_model}", dtype="float32").score(PROMPTS[:1], ["the sea"])[0]
    model = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    assert score == pytest.approx(0.1 * hand_logp(model, build_tokenizer(), PROMPTS[0], "the sea"), abs=1e-4)


def test_ties_count_half():
    report = win_rate([2.0, 1.0, 0.0, 5.0], [1.0, 1.0, 3.0, 5.0], n_boot=2000)
    assert report | {"ci95": None} == {"win_rate": 0.5, "wins": 1, "ties": 2, "losses": 1, "n": 4, "ci95": None}
    lo, hi = report["ci95"]
    assert 0 <= lo <= 0.5 <= hi <= 1


def test_win_rate_errors():
    with pytest.raises(SelfieError, match="3 scores for A but 2"):
        win_rate([1, 2, 3], [1, 2], n_boot=10)
    with pytest.raises(SelfieError, match="no scored prompts"):
        win_rate([], [], n_boot=10)


def test_bootstrap_interval_covers_the_true_rate():
    """200 experiments of 100 prompts: A wins w.p. 0.5, ties w.p. 0.2 -> true win rate 0.6; ~95% of intervals cover it."""
    rng = np.random.default_rng(1)
    covered, widths = 0, []
    for experiment in range(200):
        u = rng.random(100)
        scores_a = np.where(u < 0.5, 1.0, np.where(u < 0.7, 0.0, -1.0))
        report = win_rate(scores_a.tolist(), [0.0] * 100, n_boot=1000, seed=experiment)
        lo, hi = report["ci95"]
        covered += lo <= 0.6 <= hi
        widths.append(hi - lo)
    assert 0.9 <= covered / 200 <= 0.99
    assert 0.12 < np.mean(widths) < 0.22  # ~ 2 * 1.96 * sqrt(var / n), var = 0.5 + 0.05 - 0.36 = 0.19


def preference(prompt: list[dict], chosen: str, rejected: str) -> dict:
    return {
        "prompt_id": chosen,
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def test_judge_accuracy(length_judge):
    prefs = [
        preference(PROMPTS[0], "long answer", "short"),
        preference(PROMPTS[1], "longer one", "tiny"),
        preference(PROMPTS[0], "no", "a longer rejected"),
        preference(PROMPTS[1], "same", "size"),
    ]
    report = judge_accuracy(length_judge, prefs)
    assert (report["accuracy"], report["n"], report["ties"]) == (0.5, 4, 1)
    assert report["ci95"][0] <= 0.5 <= report["ci95"][1]
    with pytest.raises(SelfieError, match="row 0.*'chosen'"):
        judge_accuracy(length_judge, [{"prompt_id": "x", "prompt": PROMPTS[0], "chosen": "text", "rejected": []}])


def test_scores_from_a_judge_make_pairs_by_the_loops_rules(length_judge, tiny_model):
    rows = [
        {"prompt_id": "a", "prompt": PROMPTS[0], "responses": ["mid text", "the longest text", "x"], "finished": [True] * 3},
        {"prompt_id": "b", "prompt": PROMPTS[1], "responses": ["same", "same"], "finished": [True, True]},
        {"prompt_id": "c", "prompt": PROMPTS[1], "responses": ["only one"], "finished": [True]},
        {"prompt_id": "d", "prompt": PROMPTS[0], "responses": ["cut off at the limit", "ok"], "finished": [False, True]},
        {"prompt_id": "e", "prompt": PROMPTS[0], "responses": ["cut", "also cut"], "finished": [False, False]},
    ]
    tokenizer = load_tokenizer(tiny_model)
    stop_ids = {tokenizer.eos_token_id}
    judgments = score_responses(length_judge, rows, tokenizer, stop_ids)
    assert judgments[0]["rewards"] == [8, 16, 1]
    # token counts as the judge and trainer see them: the end-of-turn token only after a finished response
    assert judgments[3]["num_tokens"][1] == len(tokenizer("ok", add_special_tokens=False)["input_ids"]) + 1
    assert judgments[3]["num_tokens"][0] == len(tokenizer("cut off at the limit", add_special_tokens=False)["input_ids"])
    pairs, metrics = select_pairs(rows, judgments, JudgeConfig(truncated="drop", length_penalty=0.0).rules)
    assert metrics["dropped"] == {
        "identical": 1,
        "single_response": 1,
        "all_truncated": 1,
        "unjudged": 0,
        "anchor_preferred": 0,
        "low_margin": 0,
        "disagreement": 0,
    }
    assert [p["prompt_id"] for p in pairs] == ["a", "d"]
    a, d = pairs
    assert a["chosen"] == [{"role": "assistant", "content": "the longest text"}]
    assert a["rejected"] == [{"role": "assistant", "content": "x"}]
    assert a["margin"] == 15.0 and a["prompt"] == PROMPTS[0]
    assert d["chosen"][0]["content"] == "ok" and d["margin"] == 2.0 - 20.0  # a truncated response is never chosen
    assert pair_agreement(length_judge, pairs) == 0.5
    with pytest.raises(SelfieError, match="row 1: missing key 'responses'"):
        score_responses(length_judge, [{"prompt_id": "z", "prompt": PROMPTS[0]}], tokenizer, stop_ids)


def test_compare_models_and_report(tiny_model, adapter, length_judge, tmp_path):
    prompts = [{"prompt_id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS * 2)]
    prompts[2]["prompt_id"], prompts[3]["prompt_id"] = "p2", "p3"
    out = tmp_path / "cmp"
    options = EvalOptions(max_new_tokens=6, seed=3, batch_size=4, dtype="float32")
    report = compare_models(length_judge, tiny_model, str(adapter), tiny_model, None, prompts, options, output_dir=out)
    scored = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [s["prompt_id"] for s in scored] == ["p0", "p1", "p2", "p3"]
    assert all(s["score_a"] == len(s["response_a"]) and s["score_b"] == len(s["response_b"]) for s in scored)
    a_scores, b_scores = [s["score_a"] for s in scored], [s["score_b"] for s in scored]
    lengths = [[len(s[f"response_{x}"]) for s in scored] for x in "ab"]
    assert report == win_rate(a_scores, b_scores, EvalOptions.n_boot, seed=3) | length_adjusted(
        a_scores, b_scores, *lengths, EvalOptions.n_boot, seed=3
    ) | {"a": report["a"], "b": report["b"], "unjudged": 0}
    assert report["a"]["chars_mean"] == np.mean(lengths[0])
    assert report["a"]["adapter"] == str(adapter) and report["b"]["adapter"] is None
    assert report["a"]["score_mean"] == pytest.approx(np.mean([s["score_a"] for s in scored]))

    write_report(out, {"kind": "winrate", "judge": "callable:my_judges:length", **report})
    assert json.loads((out / "report.json").read_text())["n"] == 4
    assert "| win rate of A |" in (out / "report.md").read_text()
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_run_scores(tiny_model, adapter, length_judge, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_recipe(load_recipe(None, {"model": {"name": tiny_model}, "output_dir": str(run)})))
    for t in (0, 1):
        shutil.copytree(adapter, run / f"iter_{t:03d}" / "adapter")
    (run / "iter_002").mkdir()  # an unfinished iteration has no adapter yet
    prompts = [{"prompt_id": "p0", "prompt": PROMPTS[0]}, {"prompt_id": "p1", "prompt": PROMPTS[1]}]
    scores = run_scores(RunContext.load(run), length_judge, prompts, EvalOptions(max_new_tokens=5, batch_size=2, dtype="float32"))
    assert list(scores) == [INIT, 0, 1]
    assert scores[0] == scores[1]  # same adapter, same sampling seed
    assert all(s["n"] == 2 for s in scores.values())
    write_report(
        tmp_path / "rep",
        {
            "kind": "run",
            "judge": "len",
            "run_dir": str(run),
            "rows": [{"iteration": k, "label": str(k), **v} for k, v in scores.items()],
        },
    )
    assert (tmp_path / "rep" / "report.png").is_file()
    shutil.rmtree(run / "iter_000")
    shutil.rmtree(run / "iter_001")
    with pytest.raises(SelfieError, match="no finished adapters"):
        run_scores(RunContext.load(run), length_judge, prompts)


def test_length_adjusted_win_rate_equals_a_hand_computation():
    # A is 50 characters longer on half the prompts (wins 6 of 10 there) and shorter on the other half (wins 2 of 10).
    # Two length values make the logistic fit saturated: logit p(+) = b0 + b1 x, logit p(-) = b0 - b1 x, so the win
    # rate at equal length is sigmoid((logit 0.6 + logit 0.2) / 2), whatever x = tanh(50 / std) is.
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    expected = 1 / (1 + np.exp(-(logit(0.6) + logit(0.2)) / 2))
    scores_a = [1.0] * 6 + [0.0] * 4 + [1.0] * 2 + [0.0] * 8
    scores_b = [0.5] * 20
    lengths_a = [150] * 10 + [100] * 10
    lengths_b = [100] * 10 + [150] * 10
    report = length_adjusted(scores_a, scores_b, lengths_a, lengths_b, n_boot=200)
    assert report["length_adjusted_win_rate"] == pytest.approx(expected, abs=1e-9)
    assert win_rate(scores_a, scores_b, n_boot=10)["win_rate"] == 0.4 and expected == pytest.approx(0.3798, abs=1e-4)
    assert report["length_adjusted_ci95"][0] <= report["length_adjusted_win_rate"] <= report["length_adjusted_ci95"][1]
    # no length difference: the plain win rate
    assert length_adjusted(scores_a, scores_b, [10] * 20, [10] * 20, n_boot=10)["length_adjusted_win_rate"] == 0.4
