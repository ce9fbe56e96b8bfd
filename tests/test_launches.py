"""The loop as the recipes launch it: `accelerate launch --config_file accelerate_configs/<config>.yaml
scripts/launch/run_spa.py RECIPE`, the whole loop (the seed stage with its label-signal check, generate, judge,
train, eval) under DeepSpeed ZeRO-3 and ZeRO-2 (2 processes, CPU) and ZeRO-3 in one process; every labeller and
`init:` edit under ZeRO-3; each stage leaving no model behind. DDP's loop is test_loop's two-process test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from launcher import accelerate_launch

from selfie.io import read_jsonl

from test_loop import ROOT, recipe_args, selfie_cmd, write_inputs, write_recipe
from tiny import build_tiny_model

CONFIGS = ROOT / "accelerate_configs"
# 1 pair per process and step, 2 pairs per optimizer step on any launch: one recipe for every process count, so a
# run directory of one launch resumes under another
GLOBAL_BATCH = ["--train.per_device_train_batch_size", "1", "--train.global_batch_size", "2"]
ONE_ITERATION = ["--data.iteration_sizes", "[6]", "--num_iterations", "1", "--report_to", "[]"]
LOOP = [(0, "seed"), (1, "generate"), (1, "judge"), (1, "train"), (2, "generate"), (2, "judge"), (2, "train")]
GOLD = "def vowels(prompt, response):\n    return sum(ch in 'aeiou' for ch in response)\n"
# selfie's command line with each stage followed by a count of the models it left alive (tests/stage_leaks.py)
CHECKED_RUN = ROOT / "tests" / "stage_leaks.py"


@pytest.fixture(scope="module")
def inputs(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny recipe, and a directory holding its eval prompts and the callable judge gold:vowels."""
    directory = tmp_path_factory.mktemp("launch-inputs")
    (directory / "gold.py").write_text(GOLD)
    (directory / "eval.jsonl").write_text("".join(json.dumps({"prompt": f"tell me about {t}"}) + "\n" for t in ("rain", "bread")))
    return write_recipe(directory, tiny_model, *write_inputs(directory)), directory


def environment(directory: Path) -> dict[str, str]:
    return os.environ | {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(directory)}


def launch(config: str, processes: int, recipe: Path, run_dir: Path, directory: Path, *extra: str, entry: Path | None = None):
    """`accelerate launch --config_file accelerate_configs/<config> --num_processes N scripts/launch/run_spa.py ...`"""
    cmd = accelerate_launch(
        CONFIGS / config, "--num_processes", str(processes), str(entry or ROOT / "scripts" / "launch" / "run_spa.py")
    )
    cmd += recipe_args(recipe, run_dir, *GLOBAL_BATCH, *extra)
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=environment(directory))
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def stages_done(run_dir: Path) -> list[tuple[int, str]]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"])
    return [(s["iteration"], s["stage"]) for s in manifest["stages"]]


def metrics(run_dir: Path, t: int) -> dict:
    return json.loads((run_dir / f"iter_{t:03d}" / "metrics.json").read_text())


def eval_section(directory: Path) -> str:
    section = {"judge": "callable:gold:vowels", "prompts": str(directory / "eval.jsonl"), "num_prompts": 2}
    return json.dumps({**section, "max_new_tokens": 8, "baseline": "init", "n_boot": 100})


# validation measured in every iteration, its checks reported (2 held-out pairs could stop the loop at random)
VALIDATION = ("--validation", json.dumps({"pairs": 2, "n_boot": 100, "stop": False}))


@pytest.fixture(scope="module")
def zero3_run(inputs, tmp_path_factory) -> Path:
    """The paper's launch: ZeRO-3 over 2 processes, 2 iterations plus eval and validate stages each."""
    recipe, directory = inputs
    run_dir = tmp_path_factory.mktemp("zero3") / "run"
    launch("deepspeed_zero3.yaml", 2, recipe, run_dir, directory, "--eval", eval_section(directory), *VALIDATION)
    return run_dir


def test_zero3_over_two_processes_runs_the_whole_loop_with_its_checks_and_eval(zero3_run):
    assert stages_done(zero3_run) == [
        (0, "seed"),
        (0, "validate"),
        *[(t, stage) for t in (1, 2) for stage in ("generate", "judge", "train", "eval", "validate")],
    ]
    seed = metrics(zero3_run, 0)["seed"]
    assert (seed["distributed"], seed["processes"]) == ("DEEPSPEED", 2)
    assert seed["label_signal"]["folds"] == 2 and 0 <= seed["label_signal"]["accuracy"] <= 1  # its fold trainings ran
    for t in (1, 2):
        assert metrics(zero3_run, t)["train"]["distributed"] == "DEEPSPEED"
        assert json.loads((zero3_run / f"iter_{t:03d}" / "eval.json").read_text())["n"] == 2
        assert set(metrics(zero3_run, t)["memory"]) == {"generate", "judge", "train", "eval", "validate"}
    for t in (0, 1, 2):
        validated = metrics(zero3_run, t)["validate"]
        assert validated["pairs"] == 2 and 0 <= validated["accuracy"] <= 1 and validated["loss"] > 0
    assert (zero3_run / "summary.md").is_file()


def test_given_the_same_adapter_zero3s_two_processes_write_the_rows_one_process_writes(zero3_run, inputs, tmp_path):
    recipe, directory = inputs
    single = tmp_path / "single"
    shutil.copytree(zero3_run, single, ignore=shutil.ignore_patterns("wandb", "iter_001", "iter_002", "summary.*"))
    manifest = json.loads((single / "manifest.json").read_text())
    manifest["stages"] = manifest["stages"][:1]  # the ZeRO-3 seed adapter, then one process from there
    (single / "manifest.json").write_text(json.dumps(manifest))
    cmd = selfie_cmd("run", *recipe_args(recipe, single, *GLOBAL_BATCH, "--eval", eval_section(directory), *VALIDATION))
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=environment(directory))
    assert result.returncode == 0, result.stderr[-4000:]
    ran = zero3_run / "iter_001"
    assert read_jsonl(single / "iter_001" / "responses.jsonl") == read_jsonl(ran / "responses.jsonl")
    for one, two in zip(read_jsonl(single / "iter_001" / "judgments.jsonl"), read_jsonl(ran / "judgments.jsonl")):
        assert one["prompt_id"] == two["prompt_id"] and one["num_tokens"] == two["num_tokens"]
        assert one["rewards"] == pytest.approx(two["rewards"], abs=1e-6)
    assert read_jsonl(single / "iter_001" / "pairs.jsonl") == read_jsonl(ran / "pairs.jsonl")


def test_zero2_over_two_processes_runs_the_whole_loop(inputs, tmp_path):
    recipe, directory = inputs
    launch("deepspeed_zero2.yaml", 2, recipe, tmp_path / "run", directory)
    assert stages_done(tmp_path / "run") == LOOP
    assert metrics(tmp_path / "run", 2)["train"]["distributed"] == "DEEPSPEED"


def test_zero3_in_one_process_runs_the_loop_and_no_stage_leaves_a_model_alive(inputs, tmp_path):
    """With the Bradley-Terry labeller and an AlignEZ pi_init; the same command line, counting models after each stage."""
    recipe, directory = inputs
    alignez = {"method": "alignez", "num_prompts": 4, "max_new_tokens_resp": 8, "batch_size": 4, "max_new_tokens_char": 6}
    edit = ["--init", json.dumps({**alignez, "n_layers": 1, "alpha": 2.0}), "--data.seed_pairs", "alignez"]
    run_dir = tmp_path / "run"
    launch("deepspeed_zero3.yaml", 1, recipe, run_dir, directory, *edit, "--judge.labeller", "bradley-terry", entry=CHECKED_RUN)
    assert stages_done(run_dir) == [(0, "init"), *LOOP]
    left = json.loads((run_dir / "models_left.json").read_text())
    assert [tuple(entry["stage"]) for entry in left] == [(0, "init"), *LOOP] and all(not e["models"] for e in left)
    assert metrics(run_dir, 0)["seed"]["labeller"]["reward_head"] == "iter_000/reward_head"


@pytest.mark.parametrize(
    "case, extra",
    [
        # the ensemble's member trainings after the seed training; merge mode reloads the base in the training stage
        ("ensemble-rahf-merge", ["--judge.labeller", "ensemble", "--judge.ensemble_size", "2", "--train.adapter_mode", "merge"]),
        ("judge-spec", ["--judge.labeller", "callable:gold:vowels", "--data.seed_judge", "callable:gold:vowels"]),
    ],
)
def test_every_labeller_and_edit_runs_under_zero3(case, extra, inputs, tmp_path):
    recipe, directory = inputs
    if case == "ensemble-rahf-merge":
        rahf = {"method": "rahf", "num_prompts": 4, "max_new_tokens_resp": 8, "batch_size": 4, "steps": 3}
        extra = [*extra, "--init", json.dumps(rahf)]
    else:  # the seed labelled by the judge: 4 prompts of the pool, 2 samples each
        extra = [*extra, "--data.seed_pairs", "null", "--data.seed_size", "4"]
    run_dir = tmp_path / "run"
    launch("deepspeed_zero3.yaml", 2, recipe, run_dir, directory, *ONE_ITERATION, *extra)
    assert stages_done(run_dir)[-1] == (1, "train")
    assert metrics(run_dir, 1)["judge"]["labeller"] == extra[1]


def test_qlora_under_zero3_runs_the_loop(inputs, tmp_path):
    """bitsandbytes packs 4-bit weights in blocks of 64 inputs: a model of hidden size 64."""
    recipe, directory = inputs
    model = build_tiny_model(tmp_path / "model64", hidden_size=64)
    run_dir = tmp_path / "run"
    launch(
        "deepspeed_zero3.yaml", 2, recipe, run_dir, directory, *ONE_ITERATION, "--model.name", str(model),
        "--model.load_in_4bit", "true",
    )  # fmt: skip
    assert stages_done(run_dir)[-1] == (1, "train")
    assert metrics(run_dir, 1)["train"]["distributed"] == "DEEPSPEED"


SLOW_RANK_0 = """
import sys, time
from selfie.config.loader import load_recipe
from selfie.run.loop import launched_ranks
ranks = launched_ranks(load_recipe(None, ["--train.ddp_timeout", sys.argv[1]]))
ranks.on_main(lambda: time.sleep(15))  # rank 1 waits for rank 0's result meanwhile
print("rank", ranks.state.process_index, "done")
"""


def test_train_ddp_timeout_is_how_long_ranks_wait_for_rank_0(tmp_path):
    """Rank 0 alone works 15 s; with train.ddp_timeout 5 rank 1 stops waiting after its 5000 ms (the default: 30 min).
    The timeout also bounds the process group's connection at start, so it leaves the two processes time to meet."""
    script = tmp_path / "slow_rank_0.py"
    script.write_text(SLOW_RANK_0)
    cmd = accelerate_launch(CONFIGS / "multi_gpu.yaml", str(script), "5")
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=environment(tmp_path))
    assert result.returncode != 0 and "rank 1 done" not in result.stdout
    assert "Timed out waiting 5000ms" in result.stderr, result.stderr[-3000:]
