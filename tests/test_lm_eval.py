"""lm-evaluation-harness (`make eval-env`) on `selfie export`'s two outputs: the merged model, and the adapter on its
exported base. A tiny seed-only run, a four-question multiple-choice task from a local JSONL file, all offline.

lm-eval runs as users run it (`lm-eval run --model hf ...`, here as `python -m lm_eval`, the same entry point), once
per model, side by side: most of each run is lm-eval indexing its built-in tasks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import textwrap
from pathlib import Path

import datasets
import peft
import pytest
import torch
import transformers

from selfie.cli.main import main

from test_loop import recipe_args, run_selfie, write_inputs, write_recipe

pytestmark = pytest.mark.usefixtures("eval_python")

TASK = "selfie_tiny_mc"
DOCS = [
    {"question": "the quick brown fox jumps over the", "choices": ["lazy dog", "sea", "apple"], "answer": 0},
    {"question": "list three fruits:", "choices": ["apple, banana, cherry", "the sun", "no bad"], "answer": 0},
    {"question": "the sun rises in the", "choices": ["west", "east", "sky"], "answer": 1},
    {"question": "please say thank", "choices": ["dog", "no", "you"], "answer": 2},
]
# seed stage only, in 2 steps, without the label-signal check; a large learning rate, so that the adapter moves the
# log-likelihoods well past the tolerance below
RUN = ["--num_iterations", "0", "--report_to", "[]", "--judge.signal_folds", "0"]
RUN += ["--train.learning_rate", "2e-2", "--train.per_device_train_batch_size", "4"]


@pytest.fixture(scope="module")
def exports(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """A seed-only tiny run, exported both ways with `selfie export`: {'merged': DIR, 'adapter': DIR}."""
    directory = tmp_path_factory.mktemp("lm-eval-run")
    recipe = write_recipe(directory, tiny_model, *write_inputs(directory))
    run_selfie("run", *recipe_args(recipe, directory / "run", *RUN))
    out = {"merged": directory / "merged", "adapter": directory / "adapter"}
    assert main(["export", str(directory / "run"), "--output", str(out["merged"])]) == 0
    assert main(["export", str(directory / "run"), "--output", str(out["adapter"]), "--adapter-only"]) == 0
    return out


def write_task(directory: Path) -> Path:
    """The task directory for --include_path: a YAML naming a local JSONL file through datasets' `json` builder."""
    data = directory / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    tasks = directory / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(
        textwrap.dedent(f"""\
            task: {TASK}
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {data}
            test_split: test
            output_type: multiple_choice
            doc_to_text: "{{{{question}}}}"
            doc_to_choice: "{{{{choices}}}}"
            doc_to_target: "{{{{answer}}}}"
            metric_list:
              - metric: acc
            """)
    )
    return tasks


@pytest.fixture(scope="module")
def scores(exports, eval_python, tmp_path_factory) -> dict[str, tuple[dict, list[dict]]]:
    """lm-eval on the adapter's base alone, on base + adapter (`peft=`) and on the merged export:
    {name: (the task's results, its logged samples in doc order)}."""
    directory = tmp_path_factory.mktemp("lm-eval")
    tasks = write_task(directory)
    base = exports["adapter"] / "base"
    model_args = {
        "base": f"pretrained={base},dtype=float32",
        "peft": f"pretrained={base},peft={exports['adapter']},dtype=float32",
        "merged": f"pretrained={exports['merged']},dtype=float32",
    }
    # offline, the built json dataset cached in the test's own directory; one thread each, as they run side by side
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(directory / "datasets"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    procs = {
        name: subprocess.Popen(
            [eval_python, "-m", "lm_eval", "run", "--model", "hf", "--model_args", args, "--tasks", TASK]
            + ["--include_path", str(tasks), "--output_path", str(directory / name), "--log_samples"]
            + ["--limit", str(len(DOCS)), "--device", "cpu", "--batch_size", "4"],
            cwd=directory,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, args in model_args.items()
    }
    out = {}
    for name, proc in procs.items():
        log, _ = proc.communicate()
        assert proc.returncode == 0, f"{name}: {log[-4000:]}"
        (results,) = (directory / name).glob("*/results_*.json")
        (samples,) = (directory / name).glob(f"*/samples_{TASK}_*.jsonl")
        rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda row: row["doc_id"])
        out[name] = json.loads(results.read_text())["results"][TASK], rows
    return out


def loglikelihoods(rows: list[dict]) -> list[float]:
    """Each choice's log-likelihood, doc by doc (lm-eval logs them as strings)."""
    return [float(ll) for row in rows for ll, _greedy in row["filtered_resps"]]


@pytest.mark.parametrize("name", ["base", "peft", "merged"])
def test_lm_eval_scores_every_doc_and_its_acc_is_the_share_of_docs_whose_answer_is_likeliest(scores, name):
    results, rows = scores[name]
    assert results["sample_len"] == len(DOCS) and [row["doc_id"] for row in rows] == list(range(len(DOCS)))
    assert 0.0 <= results["acc,none"] <= 1.0
    picked = [max(range(len(row["filtered_resps"])), key=lambda i: float(row["filtered_resps"][i][0])) for row in rows]
    assert math.isclose(results["acc,none"], sum(p == doc["answer"] for p, doc in zip(picked, DOCS)) / len(DOCS))


def test_lm_eval_applies_the_exported_adapter_to_its_exported_base(scores):
    base, peft = loglikelihoods(scores["base"][1]), loglikelihoods(scores["peft"][1])
    assert max(abs(a - b) for a, b in zip(base, peft)) > 1e-2


def test_lm_eval_scores_the_merged_export_as_it_scores_base_plus_adapter(scores):
    peft, merged = loglikelihoods(scores["peft"][1]), loglikelihoods(scores["merged"][1])
    assert len(merged) == sum(len(doc["choices"]) for doc in DOCS)
    assert max(abs(a - b) for a, b in zip(peft, merged)) < 1e-4


def test_eval_env_runs_on_selfies_own_torch_transformers_peft_and_datasets(eval_python):
    """The environment adds lm-eval and AlpacaEval without replacing the versions selfie is tested with."""
    code = (
        "import json, lm_eval, alpaca_eval, selfie, torch, transformers, peft, datasets;"
        "print(json.dumps({m.__name__: m.__version__ for m in (torch, transformers, peft, datasets)}))"
    )
    probe = subprocess.run([eval_python, "-c", code], capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert probe.returncode == 0, probe.stderr[-4000:]
    ours = {m.__name__: m.__version__ for m in (torch, transformers, peft, datasets)}
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == ours
