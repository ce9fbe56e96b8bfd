"""generate.backend vllm: vLLM's real engine (its CPU build, in its own environment) behind selfie's generation contract.

Every test here starts real vLLM workers (`make test` builds the environment and sets SELFIE_VLLM_PYTHON). The model
is the tiny random Llama at 256 hidden units: vLLM's CPU attention has kernels for head sizes of 32 and up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_generate import make_prompts

import selfie.generation.generate as gen
from selfie.config.schema import GenerateConfig, LoraConfig
from selfie.errors import SelfieError
from selfie.generation import vllm_backend
from selfie.generation.sampler import SamplingSettings
from selfie.generation.static import sample_static
from selfie.io import read_jsonl
from selfie.models import attach_lora, load_model, load_policy, save_adapter
from selfie.tokens import chat_ids

from test_loop import recipe_args, run_selfie, run_two_ranks, write_inputs, write_recipe
from tiny import build_tiny_model, perturb_adapter

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.usefixtures("vllm_python")


@pytest.fixture(scope="session")
def vllm_python() -> str:
    try:
        return vllm_backend.interpreter()
    except SelfieError as e:
        if os.environ.get("CI"):  # `make test` builds vLLM's environment: in CI these tests must run
            pytest.fail(str(e))
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("vllm-tiny") / "model", hidden_size=256))


@pytest.fixture(scope="module")
def strong_adapter(model_dir, tmp_path_factory) -> Path:
    """An adapter with large weights: it must change the greedy answer, so it shows whether it was applied."""
    torch.manual_seed(0)
    model = attach_lora(load_model(model_dir, "float32"), LoraConfig(r=4, alpha=8, dropout=0.0))
    perturb_adapter(model, seed=3, scale=1.0)
    path = tmp_path_factory.mktemp("strong") / "adapter"
    save_adapter(model, path)
    return path


PROMPTS = make_prompts(8)


def generate(model_dir: str, output: Path, *, adapter=None, backend="vllm", prompts=PROMPTS, **kwargs) -> dict:
    model, tokenizer = gen.load_generator(model_dir, adapter, "float32", backend, "cpu")
    kwargs = {"num_responses": 2, "max_new_tokens": 8, "batch_size": 4, "seed": 1, **kwargs}
    return gen.generate_responses(model, tokenizer, prompts, output, backend=backend, **kwargs)


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted vLLM generation: what reruns and resumed runs must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "responses.jsonl"
    return out, generate(model_dir, out)


def test_same_seed_same_responses_another_seed_or_k_other_responses(model_dir, reference, tmp_path):
    ref, metrics = reference
    assert generate(model_dir, tmp_path / "again.jsonl")["backend"] == "vllm"
    assert (tmp_path / "again.jsonl").read_bytes() == ref.read_bytes()
    generate(model_dir, tmp_path / "other.jsonl", seed=2)
    rows, other = read_jsonl(ref), read_jsonl(tmp_path / "other.jsonl")
    assert [r["prompt_id"] for r in rows] == sorted(p["prompt_id"] for p in PROMPTS)
    assert all(a["responses"] != b["responses"] for a, b in zip(rows, other))  # another run seed
    assert all(r["responses"][0] != r["responses"][1] for r in rows)  # another k
    assert {r["sampler"] for r in rows} == {f"vllm {metrics['vllm_version']}"}
    assert metrics["engine_startup_seconds"] > 0 and metrics["new_tokens"] > 0
    assert not list(ref.parent.glob(".*.tmp"))  # the worker's request and log are gone


def sampling(num_responses: int, stop_ids: set[int], n: int = 12) -> SamplingSettings:
    return SamplingSettings(num_responses, n, 0.0, 1.0, 0, 4, stop_ids, 0, torch.device("cpu"))


def test_an_adapter_changes_greedy_output_as_the_static_backend_does(model_dir, strong_adapter, tmp_path):
    bare, tokenizer = load_policy(model_dir, None, "float32")
    adapted, _ = load_policy(model_dir, strong_adapter, "float32")
    items = [(chat_ids(tokenizer, row["prompt"], True), row) for row in PROMPTS[:4]]
    never = {tokenizer.pad_token_id}  # no stop: every response runs its 12 tokens
    static = [outs[0][0] for group in sample_static(adapted, items, sampling(1, never)) for _, outs in group]
    static_bare = [outs[0][0] for group in sample_static(bare, items, sampling(1, never)) for _, outs in group]
    policy = vllm_backend.vllm_policy(model_dir, strong_adapter, "float32", "cpu")
    info: dict = {}
    ordered = sorted(items, key=lambda e: (len(e[0]), e[1]["prompt_id"]))  # sample_static's order
    groups = vllm_backend.sample_vllm(policy, items, sampling(1, never), tmp_path / "g.jsonl", (0, 1), info)
    by_id = {row["prompt_id"]: outs[0][0] for group in groups for row, outs in group}
    vllm = [by_id[row["prompt_id"]] for _, row in ordered]
    assert "vllm_merged_adapter" not in info  # applied as a LoRARequest
    assert [t[:6] for t in vllm] == [t[:6] for t in static]
    assert vllm != static_bare


def test_max_new_tokens_reached_is_unfinished_and_a_drawn_stop_token_finishes_and_is_left_out(model_dir, tmp_path):
    _, tokenizer = load_policy(model_dir, None, "float32")
    items = [(chat_ids(tokenizer, PROMPTS[0]["prompt"], True), PROMPTS[0])]
    policy = vllm_backend.vllm_policy(model_dir, None, "float32", "cpu")

    def run(stops: set[int]) -> tuple[list[int], bool]:
        groups = vllm_backend.sample_vllm(policy, items, sampling(1, stops), tmp_path / "g.jsonl", (0, 1), {})
        return [outs[0] for group in groups for _, outs in group][0]

    free, done = run({tokenizer.pad_token_id})  # a token greedy decoding never picks
    assert not done and len(free) == 12  # cut at max_new_tokens
    stop = free[3]  # greedy: the same first tokens, now with the 4th one a stop token
    tokens, done = run({stop})
    assert done and tokens == free[: free.index(stop)]


def _partial_rows(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def generate_cmd(model_dir: str, prompts: Path, output: Path, backend: str = "vllm") -> list[str]:
    return [
        *(sys.executable, "-m", "selfie.cli.main", "generate", "--model", model_dir, "--dtype", "float32", "--seed", "3"),
        *("--prompts", str(prompts), "--output", str(output), "--backend", backend),
        *("--max-new-tokens", "16", "--batch-size", "4"),
    ]


def test_sigkill_mid_generation_resumes_with_earlier_rows_unchanged(model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"write about topic {i} please"}) + "\n" for i in range(24)))
    reference, out = tmp_path / "reference.jsonl", tmp_path / "responses.jsonl"
    subprocess.run(generate_cmd(model_dir, prompts, reference), check=True, capture_output=True, cwd=ROOT)

    proc = subprocess.Popen(generate_cmd(model_dir, prompts, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    partial = out.with_name(out.name + ".partial")
    deadline = time.time() + 300
    while _partial_rows(partial) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_jsonl(partial)
    assert 2 <= len(before) < 24 and not out.exists()
    time.sleep(2)  # the worker follows its parent (PR_SET_PDEATHSIG)
    assert not subprocess.run(["pgrep", "-f", str(out.parent)], capture_output=True, text=True).stdout.split()

    mixed = subprocess.run(generate_cmd(model_dir, prompts, out, "static"), capture_output=True, text=True, cwd=ROOT)
    errors = [line for line in mixed.stderr.splitlines() if line.startswith("selfie: error: ")]
    assert mixed.returncode == 2 and "Traceback" not in mixed.stderr and len(errors) == 1 and "would mix samplers" in errors[0]

    subprocess.run(generate_cmd(model_dir, prompts, out), check=True, capture_output=True, cwd=ROOT)
    rows = read_jsonl(out)
    assert len(rows) == len({r["prompt_id"] for r in rows}) == 24  # no duplicates, none missing
    by_id = {r["prompt_id"]: r for r in rows}
    assert all(by_id[r["prompt_id"]] == r for r in before)  # the rows written before the kill, unchanged
    assert out.read_bytes() == reference.read_bytes()


def test_prompt_plus_max_new_tokens_beyond_the_model_is_one_line_before_any_engine(model_dir, tmp_path):
    with pytest.raises(SelfieError, match=r"exceed the model's 512 positions"):
        generate(model_dir, tmp_path / "r.jsonl", max_new_tokens=510)
    assert not list(tmp_path.glob(".*vllm*"))


def test_without_vllm_the_backend_is_one_line_saying_how_to_get_it(model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(vllm_backend.PYTHON_ENV, raising=False)
    monkeypatch.setenv("SELFIE_CACHE", str(tmp_path / "empty-cache"))  # no environment built there
    with pytest.raises(SelfieError, match="make vllm-env"):
        generate(model_dir, tmp_path / "r.jsonl")
    monkeypatch.setenv(vllm_backend.PYTHON_ENV, str(tmp_path / "nowhere" / "python"))
    with pytest.raises(SelfieError, match="is not a file"):
        generate(model_dir, tmp_path / "r.jsonl")


@pytest.fixture(scope="module")
def loop_recipe(model_dir, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("loop")
    return write_recipe(directory, model_dir, *write_inputs(directory))


LOOP = ("--num_iterations", "1", "--generate.backend", "vllm", "--generate.batch_size", "4")


def test_the_loop_runs_on_vllm_and_two_ranks_cover_every_prompt_once(loop_recipe, tmp_path):
    one = tmp_path / "one"
    run_selfie("run", *recipe_args(loop_recipe, one, *LOOP))
    responses = read_jsonl(one / "iter_001" / "responses.jsonl")
    assert len(responses) == 6 and {r["sampler"].split()[0] for r in responses} == {"vllm"}
    assert (one / "iter_001" / "adapter" / "adapter_model.safetensors").is_file()

    two = tmp_path / "two"
    run_two_ranks(loop_recipe, two, *LOOP, "--generate.max_num_seqs", "3")
    merged = read_jsonl(two / "iter_001" / "responses.jsonl")
    assert sorted(r["prompt_id"] for r in merged) == sorted(r["prompt_id"] for r in responses)  # each prompt once
    # per-request seeds: a prompt's responses depend neither on its rank's other prompts nor on the engine's size
    assert merged == responses
    generated = json.loads((two / "iter_001" / "metrics.json").read_text())["generate"]
    assert generated["vllm_max_num_seqs"] == 3 * 2  # each rank's engine holds 3 sequences; counts add up over ranks


def test_the_engine_is_sized_by_its_own_keys_not_the_batch_size(model_dir):
    """On CPU the KV cache selfie reserves holds generate.max_num_seqs sequences, else generate.batch_size."""
    plain = vllm_backend.vllm_policy(model_dir, None, "float32", torch.device("cpu"))
    sized = vllm_backend.vllm_policy(model_dir, None, "float32", torch.device("cpu"), GenerateConfig(max_num_seqs=32))
    by_batch, by_key = vllm_backend.engine_settings(plain, 8, 100), vllm_backend.engine_settings(sized, 8, 100)
    assert (by_batch["max_num_seqs"], by_key["max_num_seqs"]) == (8, 32)
    assert by_key["kv_cache_bytes"] - (64 << 20) == pytest.approx(4 * (by_batch["kv_cache_bytes"] - (64 << 20)), rel=1e-6)
