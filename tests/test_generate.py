"""Sampling: reproducible per prompt, independent of batch size / order / sharding, resumable, stops at EOS."""

from __future__ import annotations

import argparse
import json
import random

import pytest
import torch

import selfie.generate as gen
from selfie.errors import SelfieError
from selfie.io import read_jsonl
from selfie.models import load_policy
from selfie.tokens import chat_ids

TOPICS = ["the sea", "a fox", "the sun rises in the east", "apples", "the sky", "a dog", "hello", "numbers 0123"]


def make_prompts(n: int = 6) -> list[dict]:
    prompts = []
    for i in range(n):
        messages = [{"role": "user", "content": f"write about {TOPICS[i % len(TOPICS)]} " + "please " * (i % 3)}]
        if i % 2:
            messages.insert(0, {"role": "system", "content": "You are a helpful assistant."})
        prompts.append({"prompt_id": f"p{i:02d}", "prompt": messages})
    return prompts


@pytest.fixture(scope="module")
def policy(tiny_model):
    return load_policy(tiny_model, None, "float32")


def run(policy, path, prompts, **kwargs) -> list[dict]:
    model, tokenizer = policy
    kwargs = {"num_responses": 2, "max_new_tokens": 12, "batch_size": 4, **kwargs}
    gen.generate_responses(model, tokenizer, prompts, path, **kwargs)
    return read_jsonl(path)


def test_rows_follow_design_format(policy, tmp_path):
    rows = run(policy, tmp_path / "r.jsonl", make_prompts(5), num_responses=3)
    assert [r["prompt_id"] for r in rows] == sorted(r["prompt_id"] for r in rows)
    for row in rows:
        assert list(row) == ["prompt_id", "prompt", "responses", "finished"]
        assert len(row["responses"]) == len(row["finished"]) == 3
        assert all(isinstance(t, str) and "<|im_end|>" not in t for t in row["responses"])
        assert all(isinstance(f, bool) for f in row["finished"])
    assert not (tmp_path / "r.jsonl.partial").exists()


def test_same_seed_same_text_whatever_the_batch_size_or_order(policy, tmp_path):
    prompts = make_prompts(6)
    base = run(policy, tmp_path / "b1.jsonl", prompts, batch_size=1)
    shuffled = prompts[::-1]
    assert run(policy, tmp_path / "b4.jsonl", shuffled, batch_size=4) == base
    assert run(policy, tmp_path / "b7.jsonl", prompts, batch_size=7) == base
    # A prompt's responses do not depend on the other prompts in the run either.
    assert run(policy, tmp_path / "one.jsonl", prompts[2:3]) == base[2:3]
    other_seed = run(policy, tmp_path / "s.jsonl", prompts, seed=7)
    assert [r["responses"] for r in other_seed] != [r["responses"] for r in base]
    assert base[0]["responses"][0] != base[0]["responses"][1]  # the K samples differ


def test_shards_partition_the_prompts(policy, tmp_path):
    prompts = make_prompts(7)
    full = run(policy, tmp_path / "full.jsonl", prompts)
    parts = [run(policy, tmp_path / f"s{r}.jsonl", prompts, shard=(r, 3)) for r in range(3)]
    assert sorted((row for p in parts for row in p), key=lambda r: r["prompt_id"]) == full
    assert [len(p) for p in parts] == [3, 2, 2]


def test_resume_after_interruption_redoes_nothing(policy, tmp_path, monkeypatch):
    prompts = make_prompts(8)
    expected = run(policy, tmp_path / "ref.jsonl", prompts, batch_size=2)  # one prompt (2 rows) per batch
    real, calls = gen.sample_batch, []

    def crash_after_three(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) > 3:
            raise KeyboardInterrupt  # as if killed mid-run
        return real(*args, **kwargs)

    out = tmp_path / "r.jsonl"
    monkeypatch.setattr(gen, "sample_batch", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        run(policy, out, prompts, batch_size=2)
    partial = tmp_path / "r.jsonl.partial"
    assert not out.exists() and len(read_jsonl(partial)) == 3
    with open(partial, "a") as f:
        f.write('{"prompt_id": "p0')  # a torn line from the kill

    calls.clear()
    monkeypatch.setattr(gen, "sample_batch", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    rows = run(policy, out, prompts, batch_size=2)
    assert len(calls) == 5  # only the 5 prompts not done before
    assert rows == expected and not partial.exists()


def test_finished_only_when_a_stop_token_is_drawn(policy):
    model, tokenizer = policy
    prompt = chat_ids(tokenizer, [{"role": "user", "content": "hello world"}], True)
    greedy = lambda stop, n: gen.sample_batch(  # noqa: E731
        model, [prompt], [[torch.Generator()]], max_new_tokens=n, temperature=0.0, top_p=1.0, stop_ids=stop, pad_id=0)[0][0]
    tokens, done = greedy(set(), 10)
    assert len(tokens) == 10 and not done
    stop = tokens[3]
    first = tokens.index(stop)
    assert greedy({stop}, 10) == (tokens[:first], True)
    assert greedy({stop}, first) == (tokens[:first], False)  # the limit came first


def test_tiny_top_p_is_greedy(policy, tmp_path):
    prompts = make_prompts(3)
    assert run(policy, tmp_path / "a.jsonl", prompts, top_p=1e-6) == run(policy, tmp_path / "b.jsonl", prompts, temperature=0.0)


def test_draw_follows_the_distribution():
    logits = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).log()
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.cat([gen._draw(logits, [g], 1.0, 1.0) for _ in range(4000)]), minlength=4) / 4000
    assert counts[1] == 0 and torch.allclose(counts, torch.tensor([0.1, 0.0, 0.6, 0.3]), atol=0.03)
    nucleus = torch.cat([gen._draw(logits, [g], 1.0, 0.65) for _ in range(500)])
    assert set(nucleus.tolist()) == {2, 3}  # 0.6 alone is under 0.65, so 0.3 joins; 0.1 never does


@pytest.mark.parametrize("bad, message", [
    ({"prompt": [{"role": "user", "content": "x"}]}, "row 2: missing key 'prompt_id'"),
    ({"prompt_id": "p00", "prompt": [{"role": "user", "content": "x"}]}, "row 2: duplicate prompt_id 'p00'"),
    ({"prompt_id": "b", "prompt": "just text"}, "row 2: key 'prompt' must be"),
    ({"prompt_id": 3, "prompt": [{"role": "user", "content": "x"}]}, "row 2: key 'prompt_id' must be a string"),
])
def test_bad_prompt_rows_are_refused_before_writing(policy, tmp_path, bad, message):
    with pytest.raises(SelfieError, match=message):
        run(policy, tmp_path / "r.jsonl", make_prompts(1) + [bad])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smollm2_batch_size_does_not_change_the_text(tmp_path):
    """Real model, float32: batch 1 and batch 4 (different padding and batch shapes) give the same samples."""
    policy = load_policy("smollm2-135m", None, "float32")
    questions = ["Say hello.", "Write a haiku about autumn.", "Give me two tips for sleeping better.", "What is 2 + 2?"]
    prompts = [{"prompt_id": f"q{i}", "prompt": [{"role": "user", "content": q}]} for i, q in enumerate(questions)]
    one = run(policy, tmp_path / "1.jsonl", prompts, batch_size=1, max_new_tokens=24)
    four = run(policy, tmp_path / "4.jsonl", random.Random(0).sample(prompts, 4), batch_size=4, max_new_tokens=24)
    assert one == four, json.dumps([one, four], indent=1)
    finished = [f for row in one for f in row["finished"]]
    assert any(finished) and not all(finished)  # both ways of ending are exercised


def cli(*argv: str) -> None:
    parser = argparse.ArgumentParser()
    gen.add_generate_args(parser)
    gen.run_generate_command(parser.parse_args(list(argv)))


def test_cli_samples_a_prompt_file(tiny_model, tmp_path):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in make_prompts(3)))
    cli("--model", tiny_model, "--prompts", str(tmp_path / "prompts.jsonl"), "--output", str(tmp_path / "r.jsonl"),
        "--num-responses", "3", "--max-new-tokens", "5", "--temperature", "0.9", "--top-p", "0.9", "--seed", "1",
        "--batch-size", "2", "--dtype", "float32")
    rows = read_jsonl(tmp_path / "r.jsonl")
    assert [r["prompt_id"] for r in rows] == ["p00", "p01", "p02"] and all(len(r["responses"]) == 3 for r in rows)


@pytest.mark.parametrize("content, message", [(None, "nope.jsonl: file not found"), ('{"prompt_id": "a"\n', "not valid JSON")])
def test_cli_refuses_bad_prompt_files_and_leaves_nothing(tiny_model, tmp_path, content, message):
    prompts = tmp_path / ("nope.jsonl" if content is None else "prompts.jsonl")
    if content is not None:
        prompts.write_text(content)
    with pytest.raises(SelfieError, match=message):
        cli("--model", tiny_model, "--prompts", str(prompts), "--output", str(tmp_path / "out" / "r.jsonl"))
    assert not (tmp_path / "out").exists()
