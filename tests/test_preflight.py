"""Bad recipes and inputs are refused before anything is written: one line naming the key, file or row, exit 2,
no run directory; `selfie run --dry-run` prints the plan and writes nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from selfie.cli.main import main
from selfie.config.loader import load_recipe
from selfie.training.arguments import accumulation_steps

from test_loop import ROOT, write_inputs, write_recipe

JUDGES = """
def length(prompt, response):
    return float(len(response))
"""


def make_inputs(directory: Path, model: str) -> dict[str, Path]:
    """The loop tests' recipe and inputs, a malformed prompt file, a judge module and a file where a directory goes."""
    prompts, seed = write_inputs(directory)
    bad = directory / "bad.jsonl"
    bad.write_text("".join(prompts.read_text().splitlines(keepends=True)[:2]) + "{not json\n")
    (directory / "preflight_judges.py").write_text(JUDGES)
    (directory / "a-file").write_text("not a directory")
    same = directory / "same.jsonl"  # every pair's chosen is its rejected
    same.write_text(
        "".join(json.dumps({**row, "rejected": row["chosen"]}) + "\n" for row in map(json.loads, seed.read_text().splitlines()))
    )
    recipe = write_recipe(directory, model, prompts, seed)
    return {"recipe": recipe, "prompts": prompts, "bad": bad, "dir": directory, "same": same}


@pytest.fixture(scope="module")
def inputs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    return make_inputs(tmp_path_factory.mktemp("preflight"), tiny_model)


def run(inputs: dict, run_dir: Path, overrides: list[str], capsys, dry_run: bool) -> tuple[int, str, str]:
    code = main(["run", str(inputs["recipe"]), "--output_dir", str(run_dir), *overrides, *(["--dry-run"] if dry_run else [])])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def with_paths(text: str, inputs: dict) -> str:
    for name, path in inputs.items():
        text = text.replace(f"<{name}>", str(path))
    return text


CASES = {  # name: (overrides, where <x> is an input path, what the one line says)
    "malformed prompts": (["--data.prompts", "<bad>"], r"bad.jsonl:3: not valid JSON"),
    "missing prompts": (["--data.prompts", "<dir>/nope.jsonl"], r"nope.jsonl: file not found"),
    "slices beyond the pool": (["--data.iteration_sizes", "[12, 4]"], r"= 16 prompts, but the pool has only 12"),
    "seed pairs without labels": (["--data.seed_pairs", "<prompts>"], r"prompts.jsonl: row 1: no 'chosen' column"),
    "pool without labels": (
        ["--data.seed_pairs", "null", "--data.seed_size", "2"],
        r"the seed labels come from data.prompts, but .*prompts.jsonl: row 1: no 'chosen' column",
    ),
    "labeller module missing": (
        ["--judge.labeller", "callable:no_such_module:score"],
        r"recipe key 'judge.labeller': judge 'callable:no_such_module:score': cannot import module",
    ),
    "seed judge function missing": (
        ["--data.seed_pairs", "null", "--data.seed_size", "2", "--data.seed_judge", "callable:preflight_judges:nope"],
        r"'data.seed_judge': .* has no callable 'nope'",
    ),
    "eval judge missing": (
        ["--eval", "{judge: 'reward-model:/nonexistent/rm'}"],
        r"'eval.judge': judge 'reward-model:/nonexistent/rm': .*model directory not found",
    ),
    "unknown eval key": (["--eval", "{judge: 'callable:preflight_judges:length', bogus: 1}"], r"unknown recipe key 'eval.bogus'"),
    "init asks too much": (
        ["--init", "{method: alignez, num_prompts: 500}"],
        r"init.num_prompts: 500 requested, but 'demo' has 300",
    ),
    "unknown init key": (["--init", "{method: rahf, stepz: 3}"], r"unknown recipe key 'init.stepz'"),
    "lora target typo": (["--lora.target_modules", "[q_prj]"], r"'lora.target_modules': 'q_prj' matches no module"),
    "lora target not a layer": (["--lora.target_modules", "[model]"], r"'model' is a LlamaModel, which LoRA cannot adapt"),
    "unknown scheduler": (["--train.lr_scheduler_type", "cosin"], r"'train.lr_scheduler_type': unknown scheduler 'cosin'"),
    "scheduler TRL refuses": (
        ["--train.lr_scheduler_type", "reduce_lr_on_plateau"],
        r"the trainer refuses the recipe's train: / refine: settings: .*requires an eval strategy",
    ),
    "missing model": (["--model.name", "/nonexistent/model"], r"/nonexistent/model: model directory not found"),
    "unknown dtype": (["--model.dtype", "float17"], r"model.dtype: unknown dtype 'float17'"),
    "bad generation value": (["--generate.top_p", "0"], r"'generate.top_p': expected a value in \(0, 1\]"),
    "output under a file": (["--output_dir", "<dir>/a-file/run"], r"a-file/run: cannot be created: .*a-file is a file"),
    "override not YAML": (["--eval", "{judge:"], r"override --eval: not a YAML value"),
    "trainer kwargs not a mapping": (
        ["--train.gradient_checkpointing", "true", "--train.gradient_checkpointing_kwargs", "notadict"],
        r"override --train.gradient_checkpointing_kwargs: recipe key 'train.gradient_checkpointing_kwargs': expected a mapping",
    ),
    "negative gradient clipping": (
        ["--train.max_grad_norm", "-1"],
        r"'train.max_grad_norm': expected >= 0 \(0: no clipping\), got -1",
    ),
    "every seed pair the same response twice": (
        ["--data.seed_pairs", "<same>"],
        r"same.jsonl: every one of its 8 pairs has the same chosen and rejected response",
    ),
    "no prompt source": (
        ["--data.prompts", "[]"],
        r"override --data.prompts: .*expected a source or a non-empty list of sources, got \[\]",
    ),
    "more folds than seed pairs": (
        ["--judge.signal_folds", "100"],
        r"'judge.signal_folds': 100 folds need at least 200 seed pairs, the seed has 8; set fewer folds, or 0",
    ),
    "validation holding out every seed pair": (
        ["--validation", "{pairs: 8}"],
        r"'validation.pairs': 8 of 8 seed pairs holds out 8; it must hold out at least 1 and leave at least 1 to train on",
    ),
    "more drift prompts than the pool holds out": (
        ["--validation", "{prompts: 50}"],
        r"'validation.prompts': 50 wanted, but the pool holds out only \d+ beyond the seed and iteration slices",
    ),
    "empty override": (["--model.chat_template", ""], r"override --model.chat_template: empty value \(write null to unset a key"),
    "empty system prompt": (
        ["--data.system_prompt", '""'],
        r"'data.system_prompt': expected a non-empty message \(null: none\), got ''",
    ),
    "output where no directory can be made": (
        ["--output_dir", "/proc/selfie-run"],
        r"/proc/selfie-run: cannot be created in /proc",
    ),
    "global batch not divisible": (
        ["--train.global_batch_size", "3"],
        r"'train.global_batch_size': 3 is not a multiple of 1 process x train.per_device_train_batch_size 2 = 2",
    ),
}


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_before_anything_is_written(case, dry_run, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(inputs["dir"]))
    overrides, message = CASES[case]
    run_dir = tmp_path / "run"
    code, _, err = run(inputs, run_dir, [with_paths(o, inputs) for o in overrides], capsys, dry_run)
    assert code == 2 and err.count("\n") == 1 and err.startswith("selfie: error: "), err
    assert re.search(message, err), err
    assert not run_dir.exists() and list(tmp_path.iterdir()) == []


def test_dry_run_prints_the_plan_and_writes_nothing(inputs, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, _ = run(inputs, run_dir, ["--data.replay", "0.5"], capsys, dry_run=True)
    assert code == 0 and not run_dir.exists()
    rows = [line.split() for line in out.splitlines() if line[:4].strip().isdigit()]
    assert [(int(r[0]), r[1], r[2]) for r in rows] == [
        (0, "seed", "to"),
        (1, "generate", "to"),
        (1, "judge", "to"),
        (1, "train", "to"),
        (2, "generate", "to"),
        (2, "judge", "to"),
        (2, "train", "to"),
    ]
    assert f"{run_dir} (new)" in out and "12 prompts -> seed slice 0, iteration slices 6, 6, held out 0" in out
    assert "seed.jsonl: 8 pairs" in out
    assert "DPO of a new LoRA adapter on 8 seed pairs, 1 epoch, <= 4 optimizer steps of 2 pairs" in out  # accumulation 1
    assert "global batch 2 pairs per optimizer step = 1 process x 2 per device" in out
    assert "6 prompts x 2 responses, <= 144 new tokens" in out and "implicit reward of 12 responses -> <= 6 pairs" in out
    assert "noise-aware DPO on <= 6 pairs (+ 6 replayed seed pairs), 1 epoch, <= 6 optimizer steps" in out
    assert "iter_001/judgments.jsonl, iter_001/pairs.jsonl" in out and "iter_002/adapter" in out
    assert out.rstrip().endswith("dry run: nothing was written")


def test_dry_run_plans_gold_labels_and_eval(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(inputs["dir"]))
    judge = "callable:preflight_judges:length"
    code, out, err = run(
        inputs,
        tmp_path / "run",
        [
            "--data.seed_pairs",
            "null",
            "--data.seed_judge",
            judge,
            "--data.seed_size",
            "4",
            "--data.iteration_sizes",
            "[4, 4]",
            "--eval",
            json.dumps({"judge": judge, "num_prompts": 3, "max_new_tokens": 5}),
        ],
        capsys,
        dry_run=True,
    )
    assert code == 0, err
    assert f"4 seed prompts x 2 samples (<= 96 new tokens) labelled by {judge} -> <= 4 pairs" in out
    assert f"3 prompts x 2 models (<= 30 new tokens), scored by {judge}" in out
    assert "iter_002/eval.json" in out and not (tmp_path / "run").exists()


PAPER_RECIPES = [ROOT / "recipes" / name / "spa" / "lora.yaml" for name in ("zephyr-7b", "llama-3-8b")]


@pytest.mark.parametrize("recipe", PAPER_RECIPES, ids=lambda p: p.parent.parent.name)
def test_the_paper_recipes_dry_run_at_the_papers_global_batch_on_the_launch_in_their_header(
    recipe, inputs, tmp_path, capsys, monkeypatch
):
    """The header's `accelerate launch ... --num_processes N`, as its ranks see it (WORLD_SIZE = N); the recipe's
    model and data swapped for the tiny ones (no hub here). On 1, 2 and 8 GPUs the batch is the same 32."""
    (launch_line,) = [line for line in recipe.read_text().splitlines() if "accelerate launch" in line]
    processes = int(re.search(r"--num_processes (\d+)", launch_line)[1])
    assert f"scripts/launch/run_spa.py {recipe.relative_to(ROOT)}" in launch_line
    monkeypatch.setattr("selfie.run.preflight.world_size", lambda: processes)
    tiny = ["--model.name", str(load_recipe(inputs["recipe"]).model.name), "--data.prompts", str(inputs["prompts"])]
    tiny += [
        "--data.seed_pairs",
        str(inputs["dir"] / "seed.jsonl"),
        "--data.iteration_sizes",
        "[2, 2, 2]",
        "--data.seed_size",
        "0",
    ]
    tiny += ["--train.max_length", "256", "--validation.prompts", "0"]  # the tiny pool holds none out
    code = main(["run", str(recipe), "--output_dir", str(tmp_path / "run"), *tiny, "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "validation 1 seed pairs held out of training" in out  # a tenth of the 8, at least one
    assert f"global batch 32 pairs per optimizer step = {processes} processes x 1 per device" in out
    assert f"x {32 // processes} accumulated (train.global_batch_size)" in out
    train = load_recipe(recipe).train
    assert [n * accumulation_steps(train, n) for n in (1, 2, 4, 8)] == [32] * 4


def test_a_prompt_that_cannot_fit_is_left_out_and_named_in_the_plan(inputs, tmp_path, capsys):
    """A 5 MB one-line prompt among the iteration prompts: counted and named before anything is generated."""
    rows = [json.loads(line) for line in inputs["prompts"].read_text().splitlines()]
    rows[3]["prompt"] = "x " * 2_500_000
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(row) + "\n" for row in rows))
    code, out, err = run(inputs, tmp_path / "run", ["--data.prompts", str(pool), "--train.max_length", "64"], capsys, True)
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if "left out" in line]
    assert "1 of 6 prompts of iteration" in line and "train.max_length 64 leaves no room for a response" in line
    assert "5000012 tokens" in line
    assert sum(" 5 prompts x 2 responses" in row for row in out.splitlines()) == 1  # that slice plans 5 prompts


def test_the_plan_counts_the_seed_stages_other_trainings(inputs, tmp_path, capsys):
    code, out, _ = run(inputs, tmp_path / "run", ["--judge.labeller", "ensemble", "--judge.ensemble_size", "3"], capsys, True)
    (seed,) = [line for line in out.splitlines() if line.split()[:2] == ["0", "seed"]]
    assert code == 0 and "DPO of a new LoRA adapter on 8 seed pairs, 1 epoch, <= 4 optimizer steps of 2 pairs" in seed
    assert "+ 3 ensemble members on 8 resampled pairs each; + label-signal check: 6 trainings on 4 pairs, <= 2 steps each" in seed
