"""The loop with a representation-edited pi_init (`init:` AlignEZ / RAHF) through the real CLI, on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfie.io import read_jsonl

from test_loop import ROOT, recipe_args, selfie_cmd, write_inputs, write_recipe

TINY = {"num_prompts": 4, "max_new_tokens_resp": 8, "batch_size": 4}
INITS = {
    "alignez": {"method": "alignez", **TINY, "max_new_tokens_char": 6, "n_layers": 1, "alpha": 2.0},
    "rahf": {"method": "rahf", **TINY, "steps": 3, "learning_rate": 1e-2},  # a large step: the edit must show in the logps
}
# the seed stage and one iteration (test_loop's recipe, cut down); `init` is given whole, as YAML
SMALLER = ["--num_iterations", "1", "--report_to", "[]", "--data.iteration_sizes", "[4]"]
# the AlignEZ run takes its seed from AlignEZ's own self-generated pairs (no human label); RAHF keeps the labelled seed
SEED = {"alignez": ["--data.seed_pairs", "alignez"], "rahf": []}
EXPECTED_STAGES = [(0, "init"), (0, "seed"), (1, "generate"), (1, "judge"), (1, "train")]


def start_run(recipe: Path, run_dir: Path, method: str) -> subprocess.Popen:
    args = recipe_args(recipe, run_dir, *SMALLER, *SEED[method], "--init", json.dumps(INITS[method]))
    # one thread each: the two runs go side by side on two cores, and a tiny model gains nothing from threads
    env = os.environ | {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        selfie_cmd("run", *args), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate()
    assert proc.returncode == 0, err[-4000:]


def snapshot(run_dir: Path) -> dict[str, int]:
    """Every stage artifact and the manifest, with its modification time."""
    files = [run_dir / "manifest.json", *(run_dir / "init").rglob("*"), *run_dir.glob("iter_*/**/*")]
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in files if p.is_file()}


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict[str, tuple[Path, dict[str, int], dict[str, int]]]:
    """Both methods run to the end side by side, then again: {method: (run dir, files after the run, after the rerun)}."""
    directory = tmp_path_factory.mktemp("inputs")
    recipe = write_recipe(directory, tiny_model, *write_inputs(directory))
    run_dirs = {method: tmp_path_factory.mktemp(method) / "run" for method in INITS}
    for proc in [start_run(recipe, run_dirs[m], m) for m in INITS]:
        finish(proc)
    after_run = {m: snapshot(run_dirs[m]) for m in INITS}
    for proc in [start_run(recipe, run_dirs[m], m) for m in INITS]:
        finish(proc)
    return {m: (run_dirs[m], after_run[m], snapshot(run_dirs[m])) for m in INITS}


def hand_logp(model, tokenizer, prompt: list[dict], response: str, finished: bool) -> float:
    """Full forward of prompt + response, summed log-probs of the response tokens (end-of-turn included when finished)."""
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    prompt_len = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    ids = tokenizer(prompt_text + response + ("<|im_end|>" if finished else ""), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logps = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return sum(logps[i - 1, ids[i]].item() for i in range(prompt_len, len(ids)))


@pytest.mark.parametrize("method", list(INITS))
def test_init_stage_comes_first_and_writes_a_plain_transformers_model(runs, method):
    run_dir, _, _ = runs[method]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [(s["iteration"], s["stage"]) for s in manifest["stages"]] == EXPECTED_STAGES
    assert manifest["stages"][0]["artifacts"] == ["init/model"]
    model_dir = run_dir / "init" / "model"
    assert "auto_map" not in json.loads((model_dir / "config.json").read_text())  # no custom code to trust
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    AutoTokenizer.from_pretrained(model_dir)
    assert type(model).__module__.startswith("transformers.models.")
    assert json.loads((model_dir / "selfie_edit.json").read_text())["method"] == method
    assert json.loads((run_dir / "iter_000" / "metrics.json").read_text())["init"] == {"method": method}


@pytest.mark.parametrize("method", list(INITS))
def test_judge_reference_is_the_edited_model(runs, method, tiny_model):
    run_dir, _, _ = runs[method]
    responses = {row["prompt_id"]: row for row in read_jsonl(run_dir / "iter_001" / "responses.jsonl")}
    judged = max(read_jsonl(run_dir / "iter_001" / "judgments.jsonl"), key=lambda j: max(j["num_tokens"]))
    k = judged["num_tokens"].index(max(judged["num_tokens"]))  # the longest response: the edit shows most there
    row = responses[judged["prompt_id"]]
    args = (row["prompt"], row["responses"][k], row["finished"][k])
    edited_dir = run_dir / "init" / "model"
    edited = hand_logp(AutoModelForCausalLM.from_pretrained(edited_dir), AutoTokenizer.from_pretrained(edited_dir), *args)
    base = hand_logp(AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model), *args)
    assert abs(edited - base) > 1e-3  # the edit changes this log-prob, so the check below tells the two apart
    assert judged["reference_logps"][k] == pytest.approx(edited, abs=1e-4)


@pytest.mark.parametrize("method", list(INITS))
def test_rerunning_a_finished_run_does_nothing(runs, method):
    run_dir, after_run, after_rerun = runs[method]
    assert after_rerun == after_run
    assert "init/model/model.safetensors" in after_run and "iter_001/adapter/adapter_model.safetensors" in after_run


def test_alignez_self_generated_pairs_are_the_seed(runs):
    run_dir, _, _ = runs["alignez"]
    seed = read_jsonl(run_dir / "iter_000" / "pairs.jsonl")
    assert seed == read_jsonl(run_dir / "init" / "model.work" / "pairs.jsonl")  # the init stage's data, not sampled again
    assert len(seed) == TINY["num_prompts"] and all(
        set(p) == {"prompt_id", "prompt", "chosen", "rejected", "margin"} for p in seed
    )
