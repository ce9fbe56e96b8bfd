"""Sampling: reproducible per prompt, independent of batch size / order / sharding, resumable, stops at EOS.

The generator's contract tests run for both backends (static batches, transformers' continuous batching)."""

from __future__ import annotations

import argparse
import json
import random
import threading
import time

import pytest
import torch

import selfie.generation.generate as gen
from selfie.cli.generate import add_generate_args, run_generate_command
from selfie.errors import SelfieError
from selfie.generation.continuous import run_engine
from selfie.generation.sampler import SamplingSettings, draw
from selfie.generation.static import sample_batch
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


@pytest.fixture(params=["static", "continuous"])
def backend(request) -> str:
    return request.param


def run(policy, path, prompts, **kwargs) -> list[dict]:
    model, tokenizer = policy
    kwargs = {"num_responses": 2, "max_new_tokens": 12, "batch_size": 4, "backend": "static", **kwargs}
    gen.generate_responses(model, tokenizer, prompts, path, **kwargs)
    return read_jsonl(path)


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "generation_loop" in t.name]


def test_rows_follow_design_format(policy, tmp_path, backend):
    rows = run(policy, tmp_path / "r.jsonl", make_prompts(5), num_responses=3, backend=backend)
    assert [r["prompt_id"] for r in rows] == sorted(r["prompt_id"] for r in rows)
    for row in rows:
        assert list(row) == ["prompt_id", "prompt", "responses", "finished"]
        assert len(row["responses"]) == len(row["finished"]) == 3
        assert all(isinstance(t, str) and "<|im_end|>" not in t for t in row["responses"])
        assert all(isinstance(f, bool) for f in row["finished"])
    assert not (tmp_path / "r.jsonl.partial").exists()


def test_same_seed_same_text_whatever_the_batch_size_or_order(policy, tmp_path, backend):
    prompts = make_prompts(6)
    base = run(policy, tmp_path / "b1.jsonl", prompts, batch_size=1, backend=backend)
    shuffled = prompts[::-1]
    assert run(policy, tmp_path / "b4.jsonl", shuffled, batch_size=4, backend=backend) == base
    assert run(policy, tmp_path / "b7.jsonl", prompts, batch_size=7, backend=backend) == base
    # A prompt's responses do not depend on the other prompts in the run either.
    assert run(policy, tmp_path / "one.jsonl", prompts[2:3], backend=backend) == base[2:3]
    other_seed = run(policy, tmp_path / "s.jsonl", prompts, seed=7, backend=backend)
    assert [r["responses"] for r in other_seed] != [r["responses"] for r in base]
    assert base[0]["responses"][0] != base[0]["responses"][1]  # the K samples differ


def test_backends_write_the_same_text_with_an_adapter_too(tiny_model, prev_adapter, policy, tmp_path):
    """float32 on CPU: each response's own generator and the same logits up to rounding give the same tokens."""
    prompts = make_prompts(6)
    adapted = load_policy(tiny_model, prev_adapter, "float32")
    static = run(adapted, tmp_path / "s.jsonl", prompts, backend="static")
    assert run(adapted, tmp_path / "c.jsonl", prompts, backend="continuous") == static
    assert run(policy, tmp_path / "bare.jsonl", prompts, backend="continuous") != static  # the adapter was applied
    assert not engine_threads()


def test_shards_partition_the_prompts(policy, tmp_path, backend):
    prompts = make_prompts(7)
    full = run(policy, tmp_path / "full.jsonl", prompts, backend=backend)
    parts = [run(policy, tmp_path / f"s{r}.jsonl", prompts, shard=(r, 3), backend=backend) for r in range(3)]
    assert sorted((row for p in parts for row in p), key=lambda r: r["prompt_id"]) == full
    assert [len(p) for p in parts] == [3, 2, 2]


def test_resume_after_interruption_redoes_nothing(policy, tmp_path, monkeypatch, backend):
    prompts = make_prompts(8)
    expected = run(policy, tmp_path / "ref.jsonl", prompts, batch_size=2, backend=backend)  # static: 1 prompt per batch
    real, written, handed = gen.SAMPLERS[backend], [], []

    def crash_after_three(model, items, s):
        for group in real(model, items, s):
            if sum(written) >= 3:
                raise KeyboardInterrupt  # as if killed mid-run
            written.append(len(group))
            yield group

    out = tmp_path / "r.jsonl"
    monkeypatch.setitem(gen.SAMPLERS, backend, crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        run(policy, out, prompts, batch_size=2, backend=backend)
    partial = tmp_path / "r.jsonl.partial"
    assert not out.exists() and len(read_jsonl(partial)) == sum(written) >= 3
    assert not engine_threads()  # the interrupted engine stopped with its consumer
    with open(partial, "a") as f:
        f.write('{"prompt_id": "p0')  # a torn line from the kill

    monkeypatch.setitem(gen.SAMPLERS, backend, lambda model, items, s: handed.extend(items) or real(model, items, s))
    rows = run(policy, out, prompts, batch_size=2, backend=backend)
    assert len(handed) == 8 - sum(written)  # only the prompts not done before
    assert rows == expected and not partial.exists()


def greedy(backend: str, model, prompt: list[int], stop: set[int], n: int) -> tuple[list[int], bool]:
    s = SamplingSettings(
        num_responses=1,
        max_new_tokens=n,
        temperature=0.0,
        top_p=1.0,
        seed=0,
        batch_size=2,
        stop_ids=stop,
        pad_id=0,
        device=torch.device("cpu"),
    )
    if backend == "static":
        return sample_batch(model, [prompt], [[torch.Generator()]], s)[0][0]
    return next(iter(run_engine(model, [prompt], [[torch.Generator()]], s)))[0][1][0]


def test_finished_only_when_a_stop_token_is_drawn(policy, backend):
    model, tokenizer = policy
    prompt = chat_ids(tokenizer, [{"role": "user", "content": "hello world"}], True)
    tokens, done = greedy(backend, model, prompt, set(), 10)
    assert len(tokens) == 10 and not done
    stop = tokens[3]
    first = tokens.index(stop)
    assert greedy(backend, model, prompt, {stop}, 10) == (tokens[:first], True)
    assert greedy(backend, model, prompt, {stop}, first) == (tokens[:first], False)  # the limit came first


def test_tiny_top_p_is_greedy(policy, tmp_path, backend):
    prompts = make_prompts(3)
    assert run(policy, tmp_path / "a.jsonl", prompts, top_p=1e-6, backend=backend) == run(
        policy, tmp_path / "b.jsonl", prompts, temperature=0.0, backend=backend
    )


def slowed(real, seconds: float):
    def sampler(model, items, s):
        for group in real(model, items, s):
            time.sleep(seconds)
            yield group

    return sampler


@pytest.mark.parametrize("slow, expected", [("static", "continuous"), ("continuous", "static")])
def test_auto_measures_both_backends_and_keeps_the_faster(policy, tmp_path, monkeypatch, slow, expected):
    prompts = make_prompts(8)  # batch_size 2, K 2: a probe of 2 prompts per backend, 4 more sampled by the choice
    reference = run(policy, tmp_path / "ref.jsonl", prompts, batch_size=2)
    monkeypatch.setitem(gen.SAMPLERS, slow, slowed(gen.SAMPLERS[slow], 1.0))
    model, tokenizer = policy
    metrics = gen.generate_responses(
        model, tokenizer, prompts, tmp_path / "r.jsonl", num_responses=2, max_new_tokens=12, batch_size=2, backend="auto"
    )
    assert metrics["backend"] == expected
    assert metrics[f"auto_{slow}_tokens_per_second"] < metrics[f"auto_{expected}_tokens_per_second"]
    assert read_jsonl(tmp_path / "r.jsonl") == reference


def test_auto_without_enough_prompts_or_a_working_engine_samples_static(policy, tmp_path, monkeypatch):
    model, tokenizer = policy
    few = gen.generate_responses(
        model, tokenizer, make_prompts(7), tmp_path / "few.jsonl", num_responses=2, max_new_tokens=4, batch_size=2, backend="auto"
    )
    assert few["backend"] == "static" and "auto_static_tokens_per_second" not in few

    def broken(model, items, s):
        raise RuntimeError("this engine cannot run this model")

    monkeypatch.setitem(gen.SAMPLERS, "continuous", broken)
    prompts = make_prompts(8)
    metrics = gen.generate_responses(
        model, tokenizer, prompts, tmp_path / "r.jsonl", num_responses=2, max_new_tokens=4, batch_size=2, backend="auto"
    )
    assert metrics["backend"] == "static" and metrics["prompts"] == 8
    assert read_jsonl(tmp_path / "r.jsonl") == run(policy, tmp_path / "ref.jsonl", prompts, batch_size=2, max_new_tokens=4)


def test_unknown_backend_is_refused_before_writing(policy, tmp_path):
    with pytest.raises(SelfieError, match="generate: backend: expected .*got 'sglang'"):
        run(policy, tmp_path / "r.jsonl", make_prompts(2), backend="sglang")
    assert list(tmp_path.iterdir()) == []


def test_draw_follows_the_distribution():
    logits = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).log()
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.cat([draw(logits, [g], 1.0, 1.0) for _ in range(4000)]), minlength=4) / 4000
    assert counts[1] == 0 and torch.allclose(counts, torch.tensor([0.1, 0.0, 0.6, 0.3]), atol=0.03)
    nucleus = torch.cat([draw(logits, [g], 1.0, 0.65) for _ in range(500)])
    assert set(nucleus.tolist()) == {2, 3}  # 0.6 alone is under 0.65, so 0.3 joins; 0.1 never does


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": [{"role": "user", "content": "x"}]}, "row 2: missing key 'prompt_id'"),
        ({"prompt_id": "p00", "prompt": [{"role": "user", "content": "x"}]}, "row 2: duplicate prompt_id 'p00'"),
        ({"prompt_id": "b", "prompt": "just text"}, "row 2: key 'prompt' must be"),
        ({"prompt_id": 3, "prompt": [{"role": "user", "content": "x"}]}, "row 2: key 'prompt_id' must be a string"),
    ],
)
def test_bad_prompt_rows_are_refused_before_writing(policy, tmp_path, bad, message, backend):
    with pytest.raises(SelfieError, match=message):
        run(policy, tmp_path / "r.jsonl", make_prompts(1) + [bad], backend=backend)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smollm2_batch_size_does_not_change_the_text(tmp_path, backend):
    """Real model, float32: batch 1 and batch 4 (different padding and batch shapes) give the same samples."""
    policy = load_policy("smollm2-135m", None, "float32")
    questions = ["Say hello.", "Write a haiku about autumn.", "Give me two tips for sleeping better.", "What is 2 + 2?"]
    prompts = [{"prompt_id": f"q{i}", "prompt": [{"role": "user", "content": q}]} for i, q in enumerate(questions)]
    one = run(policy, tmp_path / "1.jsonl", prompts, batch_size=1, max_new_tokens=24, backend=backend)
    four = run(
        policy, tmp_path / "4.jsonl", random.Random(0).sample(prompts, 4), batch_size=4, max_new_tokens=24, backend=backend
    )
    assert one == four, json.dumps([one, four], indent=1)
    finished = [f for row in one for f in row["finished"]]
    assert any(finished) and not all(finished)  # both ways of ending are exercised


def cli(*argv: str) -> None:
    parser = argparse.ArgumentParser()
    add_generate_args(parser)
    run_generate_command(parser.parse_args(list(argv)))


def test_cli_samples_a_prompt_file(tiny_model, tmp_path):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in make_prompts(3)))
    cli(
        "--model",
        tiny_model,
        "--prompts",
        str(tmp_path / "prompts.jsonl"),
        "--output",
        str(tmp_path / "r.jsonl"),
        "--num-responses",
        "3",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0.9",
        "--top-p",
        "0.9",
        "--seed",
        "1",
        "--batch-size",
        "2",
        "--dtype",
        "float32",
        "--backend",
        "continuous",
    )
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
