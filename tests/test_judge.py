"""Judging: log-probs equal a plain full-forward computation, pair rules, CLI refusals, SmolLM2 end to end."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import selfie.labelling.implicit_reward as jud
import selfie.scoring
from selfie.cli.generate import add_generate_args, run_generate_command
from selfie.cli.judge import add_judge_args, run_judge_command
from selfie.config.schema import JudgeConfig
from selfie.config.schema import LoraConfig as SelfieLora
from selfie.errors import SelfieError
from selfie.io import read_jsonl
from selfie.models import attach_lora, load_model, load_policy, load_tokenizer, save_adapter
from selfie.tokens import response_token_ids

from tiny import PAIR_KEYS

ROWS = [
    {
        "prompt_id": "b",
        "prompt": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "list three fruits please"},
        ],
        "responses": ["apple, banana, cherry", "no", "the quick brown fox jumps"],
        "finished": [True, True, False],
    },
    {
        "prompt_id": "a",
        "prompt": [{"role": "user", "content": "hello world"}],
        "responses": ["good morning", "yes thank you, hello"],
        "finished": [True, False],
    },
    {
        "prompt_id": "c",
        "prompt": [{"role": "user", "content": "why does the sun rise in the east"}],
        "responses": ["", "because the world turns"],
        "finished": [True, True],
    },
]


@pytest.fixture(scope="module")
def policy(tiny_model):
    """The tiny base with a random (non-zero) LoRA adapter: policy and reference differ."""
    torch.manual_seed(0)
    model = get_peft_model(
        load_model(tiny_model, "float32"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False),
    )
    return model.eval(), load_tokenizer(tiny_model)


def hand_logp(model, tokenizer, prompt: list[dict], response: str, finished: bool) -> float:
    """Full forward of prompt + response alone, log_softmax at every position, sum over the response tokens."""
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    text = prompt_text + response + ("<|im_end|>" if finished else "")
    prompt_len = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logps = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return sum(logps[i - 1, ids[i]].item() for i in range(prompt_len, len(ids)))


def judge(policy, tmp_path, rows=ROWS, **kwargs) -> tuple[list[dict], list[dict], dict]:
    model, tokenizer = policy
    metrics = jud.judge_responses(model, tokenizer, rows, tmp_path / "j.jsonl", tmp_path / "p.jsonl", **kwargs)
    return read_jsonl(tmp_path / "j.jsonl"), read_jsonl(tmp_path / "p.jsonl"), metrics


def causal_only(module, query, key, value, attention_mask, **kwargs):
    """An attention implementation that, like flash-attention, applies only the causal mask it assumes."""
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, None, is_causal=query.shape[2] > 1, **kwargs)


AttentionInterface.register("causal_only", causal_only)
# every implementation a recipe can set that runs here (flash-attention and flex attention do not run on this CPU
# machine), and one that ignores a 4-D mask as flash-attention does
IMPLEMENTATIONS = ["eager", "sdpa", "causal_only"]


@pytest.fixture(params=IMPLEMENTATIONS)
def attention(policy, request):
    model, _ = policy
    model.set_attn_implementation(request.param)
    yield request.param
    model.set_attn_implementation("sdpa")


def test_rewards_equal_a_hand_computation(policy, attention, tmp_path):
    """Packed rows (eager, sdpa) or a row per response (any other implementation) give each response's own log-prob."""
    model, tokenizer = policy
    assert selfie.scoring.takes_packed_rows(model) == (attention != "causal_only")
    judgments, _, _ = judge(policy, tmp_path, beta=0.5, judge=JudgeConfig(token_budget=64))
    by_id = {row["prompt_id"]: row for row in ROWS}
    assert [j["prompt_id"] for j in judgments] == ["a", "b", "c"]
    for j in judgments:
        row = by_id[j["prompt_id"]]
        assert list(j) == ["prompt_id", "rewards", "policy_logps", "reference_logps", "num_tokens"]
        for k, (text, done) in enumerate(zip(row["responses"], row["finished"])):
            pol = hand_logp(model, tokenizer, row["prompt"], text, done)
            with model.disable_adapter():
                ref = hand_logp(model, tokenizer, row["prompt"], text, done)
            assert abs(pol - ref) > 1e-3  # the adapter matters, so the check below can fail
            assert j["policy_logps"][k] == pytest.approx(pol, abs=1e-5)
            assert j["reference_logps"][k] == pytest.approx(ref, abs=1e-5)
            assert j["rewards"][k] == pytest.approx(0.5 * (pol - ref), abs=1e-5)


def test_packed_rows_under_an_implementation_that_ignores_their_mask_would_be_wrong(policy, monkeypatch, tmp_path):
    """What the check above guards against: packed rows under causal_only let a response see its neighbours."""
    model, _ = policy
    model.set_attn_implementation("causal_only")
    try:
        per_row, _, _ = judge(policy, tmp_path / "rows", judge=JudgeConfig(token_budget=64))
        monkeypatch.setattr(selfie.scoring, "PACKING_IMPLEMENTATIONS", ("causal_only",))
        packed, _, _ = judge(policy, tmp_path / "packed", judge=JudgeConfig(token_budget=64))
    finally:
        model.set_attn_implementation("sdpa")
    later = [(a, b) for a, b in zip(per_row, packed) for a, b in zip(a["policy_logps"][1:], b["policy_logps"][1:])]
    assert max(abs(a - b) for a, b in later) > 1e-3


def test_batching_does_not_change_logps(policy, tmp_path):
    alone, _, _ = judge(policy, tmp_path / "small", judge=JudgeConfig(token_budget=1))
    together, _, metrics = judge(policy, tmp_path / "large", judge=JudgeConfig(token_budget=10_000))
    for a, b in zip(alone, together):
        assert a["policy_logps"] == pytest.approx(b["policy_logps"], abs=1e-5)
        assert a["num_tokens"] == b["num_tokens"]
    assert metrics["tokens"] < sum(sum(j["num_tokens"]) + 40 for j in together) * 2  # sanity: no huge padding


def test_scored_tokens_stop_at_the_end_of_turn(policy):
    _, tokenizer = policy
    prompt = [{"role": "user", "content": "hello"}]
    prefix, (done, cut, empty) = response_token_ids(
        tokenizer, prompt, ["good bad", "good bad", ""], [True, False, True], {tokenizer.eos_token_id}
    )
    assert tokenizer.decode(prefix).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(done) == "good bad<|im_end|>"  # EOS scored, the template's trailing newline not
    assert tokenizer.decode(cut) == "good bad"
    assert empty == [tokenizer.eos_token_id]


def test_plain_model_gives_zero_rewards(tiny_model, tmp_path):
    judgments, pairs, _ = judge(load_policy(tiny_model, None, "float32"), tmp_path)
    assert all(r == 0 for j in judgments for r in j["rewards"])
    assert all(p["margin"] == 0 for p in pairs)


def test_length_normalisation_divides_by_tokens(policy, tmp_path):
    plain, _, _ = judge(policy, tmp_path / "sum")
    normed, _, _ = judge(policy, tmp_path / "mean", judge=JudgeConfig(length_normalize=True))
    for s, m in zip(plain, normed):
        for k, n in enumerate(s["num_tokens"]):
            assert m["policy_logps"][k] == pytest.approx(s["policy_logps"][k] / n)
            assert m["rewards"][k] == pytest.approx(0.1 * (m["policy_logps"][k] - m["reference_logps"][k]))


def test_metrics_and_shards(policy, tmp_path):
    full, pairs, metrics = judge(policy, tmp_path / "full")
    assert metrics["pairs"] == len(pairs) == 3
    assert metrics["dropped"] == {
        "all_truncated": 0,
        "identical": 0,
        "single_response": 0,
        "unjudged": 0,
        "anchor_preferred": 0,
        "low_margin": 0,
        "disagreement": 0,
    }
    assert metrics["margin_mean"] == pytest.approx(sum(p["margin"] for p in pairs) / 3)
    # "a": its only finished response is chosen, even when the truncated one has the higher reward
    (a,) = [p for p in pairs if p["prompt_id"] == "a"]
    assert a["chosen"][0]["content"] == "good morning"
    assert metrics["negative_margin"] == sum(p["margin"] < 0 for p in pairs)
    assert metrics["responses"] == 7 and metrics["response_tokens"] == sum(sum(j["num_tokens"]) for j in full)
    parts = [judge(policy, tmp_path / f"s{r}", shard=(r, 2))[0] for r in range(2)]
    merged = sorted(parts[0] + parts[1], key=lambda j: j["prompt_id"])
    assert [j["prompt_id"] for j in merged] == [j["prompt_id"] for j in full]
    for a, b in zip(merged, full):
        assert a["rewards"] == pytest.approx(b["rewards"], abs=1e-6)


# ---- command line ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tiny_model, other_tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    lora = SelfieLora(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    for name, base in (("mine", tiny_model), ("other", other_tiny_model)):
        model = load_model(base, "float32")
        save_adapter(attach_lora(model, lora), root / name)
    return root / "mine", root / "other"


def cli(*argv: str) -> None:
    parser = argparse.ArgumentParser()
    add_judge_args(parser)
    run_judge_command(parser.parse_args(list(argv)))


def write_rows(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_cli_writes_judgments_pairs_and_metrics(tiny_model, adapters, tmp_path):
    write_rows(tmp_path / "responses.jsonl", ROWS)
    cli(
        "--model",
        tiny_model,
        "--adapter",
        str(adapters[0]),
        "--responses",
        str(tmp_path / "responses.jsonl"),
        "--output",
        str(tmp_path / "j.jsonl"),
        "--pairs",
        str(tmp_path / "p.jsonl"),
        "--beta",
        "0.2",
        "--metrics",
        str(tmp_path / "m.json"),
        "--dtype",
        "float32",
    )
    assert len(read_jsonl(tmp_path / "j.jsonl")) == 3
    assert json.loads((tmp_path / "m.json").read_text())["pairs"] == len(read_jsonl(tmp_path / "p.jsonl")) == 3


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing file", "nope.jsonl: file not found"),
        ("malformed", "responses.jsonl:2: not valid JSON"),
        ("no responses key", "responses.jsonl: row 2: missing key 'responses'"),
        ("finished mismatch", "responses.jsonl: row 1: 'responses' and 'finished' have different lengths"),
        ("other base", "other: adapter was made for another base model"),
    ],
)
def test_cli_refuses_bad_input_and_leaves_nothing(tiny_model, adapters, tmp_path, case, message):
    inputs = tmp_path / "in"
    inputs.mkdir()
    responses = inputs / ("nope.jsonl" if case == "missing file" else "responses.jsonl")
    good = json.dumps(ROWS[0])
    if case == "malformed":
        responses.write_text(good + "\n{not json\n")
    elif case == "no responses key":
        write_rows(responses, [ROWS[0], {k: v for k, v in ROWS[1].items() if k != "responses"}])
    elif case == "finished mismatch":
        write_rows(responses, [{**ROWS[0], "finished": [True]}])
    elif case != "missing file":
        write_rows(responses, ROWS)
    adapter = adapters[1] if case == "other base" else adapters[0]
    out = tmp_path / "out"
    with pytest.raises(SelfieError, match=message):
        cli(
            "--model",
            tiny_model,
            "--adapter",
            str(adapter),
            "--responses",
            str(responses),
            "--output",
            str(out / "j.jsonl"),
            "--pairs",
            str(out / "p.jsonl"),
            "--metrics",
            str(out / "m.json"),
        )
    assert not out.exists() or list(out.iterdir()) == []


# ---- SmolLM2 end to end --------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_generate_then_judge(tmp_path):
    base = load_model("smollm2-135m", "float32")
    torch.manual_seed(0)
    policy = attach_lora(base, SelfieLora(r=8, alpha=16, dropout=0.0))
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)  # a trained-looking adapter: rewards are not all zero
    save_adapter(policy, tmp_path / "adapter")
    questions = ["What is the capital of France?", "Name a primary colour.", "Say hello in French.", "What is 2 + 2?"]
    write_rows(
        tmp_path / "prompts.jsonl",
        [{"prompt_id": f"q{i}", "prompt": [{"role": "user", "content": q}]} for i, q in enumerate(questions)],
    )

    parser = argparse.ArgumentParser()
    add_generate_args(parser)
    args = parser.parse_args(
        [
            "--model",
            "smollm2-135m",
            "--adapter",
            str(tmp_path / "adapter"),
            "--prompts",
            str(tmp_path / "prompts.jsonl"),
            "--output",
            str(tmp_path / "responses.jsonl"),
            "--max-new-tokens",
            "16",
            "--dtype",
            "float32",
        ]
    )
    run_generate_command(args)
    cli(
        "--model",
        "smollm2-135m",
        "--adapter",
        str(tmp_path / "adapter"),
        "--responses",
        str(tmp_path / "responses.jsonl"),
        "--output",
        str(tmp_path / "judgments.jsonl"),
        "--pairs",
        str(tmp_path / "pairs.jsonl"),
        "--dtype",
        "float32",
    )

    responses, judgments, pairs = (read_jsonl(tmp_path / f) for f in ("responses.jsonl", "judgments.jsonl", "pairs.jsonl"))
    ids = [f"q{i}" for i in range(4)]
    assert [r["prompt_id"] for r in responses] == [j["prompt_id"] for j in judgments] == ids
    for r, j in zip(responses, judgments):
        assert set(r) == {"prompt_id", "prompt", "responses", "finished"} and len(r["responses"]) == len(r["finished"]) == 2
        assert set(j) == {"prompt_id", "rewards", "policy_logps", "reference_logps", "num_tokens"}
        assert all(isinstance(v, float) for key in ("rewards", "policy_logps", "reference_logps") for v in j[key])
        assert all(isinstance(n, int) and 0 < n <= 17 for n in j["num_tokens"])
        assert j["rewards"] == pytest.approx([0.1 * (p - q) for p, q in zip(j["policy_logps"], j["reference_logps"])])
    assert any(r != 0 for j in judgments for r in j["rewards"])
    for p in pairs:
        assert set(p) == PAIR_KEYS
        assert p["chosen"][0]["role"] == p["rejected"][0]["role"] == "assistant"
        source = next(r for r in responses if r["prompt_id"] == p["prompt_id"])
        assert source["finished"][source["responses"].index(p["chosen"][0]["content"])] == p["chosen_finished"]
        assert p["chosen"][0]["content"] != p["rejected"][0]["content"]
