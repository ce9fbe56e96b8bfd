"""`selfie export`: merged and adapter-only exports of tiny runs (with and without an AlignEZ init), the model card,
refusals, and `selfie eval` on an exported directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfie.cli.main import main
from selfie.config.loader import load_recipe
from selfie.export.policy import export_run, hub_base
from selfie.models import load_policy
from selfie.run.rundir import RunContext

from test_loop import ROOT, recipe_args, selfie_cmd, write_inputs, write_recipe

ALIGNEZ = {
    "method": "alignez",
    "num_prompts": 4,
    "max_new_tokens_resp": 8,
    "batch_size": 4,
    "max_new_tokens_char": 6,
    "n_layers": 1,
    "alpha": 2.0,
}
# plain: seed + 1 iteration with an eval stage; alignez: init + seed only (iteration 0 is its last complete one)
RUNS = {
    "plain": [
        "--num_iterations",
        "1",
        "--data.iteration_sizes",
        "[4]",
        "--eval",
        json.dumps({"judge": "callable:export_judges:length", "num_prompts": 2, "max_new_tokens": 4}),
    ],
    "alignez": ["--num_iterations", "0", "--init", json.dumps(ALIGNEZ)],
}
# a large learning rate, so that the adapter moves the logits well past the 1e-5 tolerance
COMMON = ["--report_to", "[]", "--train.learning_rate", "2e-2"]
LAST = {"plain": 1, "alignez": 0}
JUDGES = "def length(prompt, response):\n    return len(response)\n"
BATCH = [
    [{"role": "user", "content": "write a short poem about the sea"}],
    [{"role": "user", "content": "list three fruits please"}],
]


@pytest.fixture(scope="module")
def judges_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("judges")
    (directory / "export_judges.py").write_text(JUDGES)
    return directory


@pytest.fixture(scope="module")
def runs(tiny_model, judges_dir, tmp_path_factory) -> dict[str, Path]:
    """Both tiny runs, side by side (one thread each): {name: run dir}."""
    directory = tmp_path_factory.mktemp("inputs")
    recipe = write_recipe(directory, tiny_model, *write_inputs(directory))
    env = os.environ | {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(judges_dir)}
    run_dirs = {name: tmp_path_factory.mktemp(name) / "run" for name in RUNS}
    procs = {
        name: subprocess.Popen(
            selfie_cmd("run", *recipe_args(recipe, run_dirs[name], *COMMON, *RUNS[name])),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in RUNS
    }
    for name, proc in procs.items():
        _, err = proc.communicate()
        assert proc.returncode == 0, f"{name}: {err[-4000:]}"
    return run_dirs


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """{(run, 'merge' | 'adapter'): export dir}, each of the run's last completed iteration."""
    out = {}
    for name, run_dir in runs.items():
        for mode in ("merge", "adapter"):
            out[name, mode] = export_run(
                run_dir, tmp_path_factory.mktemp(f"{name}-{mode}") / "export", adapter_only=mode == "adapter"
            )
    return out


def pi_init(run_dir: Path) -> str:
    return RunContext.load(run_dir).pi_init


def batch(tokenizer) -> dict[str, torch.Tensor]:
    """A fixed, left-padded batch of two chat prompts."""
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in BATCH]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def logits(model, tokenizer) -> torch.Tensor:
    inputs = batch(tokenizer)
    return model.eval()(**inputs).logits * inputs["attention_mask"][..., None]  # padded positions are left out


@pytest.fixture(scope="module")
def policy_logits(runs) -> dict[str, torch.Tensor]:
    """selfie's own policy of the last iteration (pi_init + adapter) on the fixed batch."""
    out = {}
    for name, run_dir in runs.items():
        model, tokenizer = load_policy(pi_init(run_dir), run_dir / f"iter_{LAST[name]:03d}" / "adapter", "float32")
        out[name] = logits(model, tokenizer)
        base, _ = load_policy(pi_init(run_dir), None, "float32")
        assert (out[name] - logits(base, tokenizer)).abs().max() > 1e-3  # the adapter shows, so the checks below mean something
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_merged_export_gives_the_policy_logits_with_plain_transformers(exports, policy_logits, name, runs, tiny_model):
    directory = exports[name, "merge"]
    config = json.loads((directory / "config.json").read_text())
    assert "auto_map" not in config and config["dtype"] == "float32"  # no custom code; the base's own dtype
    assert {"model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= {p.name for p in directory.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert type(model).__module__.startswith("transformers.models.")
    torch.testing.assert_close(logits(model, AutoTokenizer.from_pretrained(directory)), policy_logits[name], rtol=0, atol=1e-5)
    if name == "alignez":  # the edit is folded in: the unedited model with the same adapter is another policy
        unedited, tokenizer = load_policy(tiny_model, runs[name] / "iter_000" / "adapter", "float32")
        assert (logits(unedited, tokenizer) - policy_logits[name]).abs().max() > 1e-3


def test_merged_export_loads_without_selfie(exports, policy_logits, tmp_path):
    """In a fresh interpreter that never imports selfie."""
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(exports["plain", "merge"])!r}, padding_side="left")
        texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in {BATCH!r}]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = AutoModelForCausalLM.from_pretrained({str(exports["plain", "merge"])!r})(**inputs).logits
        torch.save(out * inputs["attention_mask"][..., None], {str(tmp_path / "logits.pt")!r})
        assert not any(m == "selfie" or m.startswith("selfie.") for m in sys.modules)
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), policy_logits["plain"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(RUNS))
def test_adapter_only_export_loads_with_plain_peft(exports, policy_logits, name, runs, monkeypatch, tmp_path):
    directory = exports[name, "adapter"]
    adapter_config = json.loads((directory / "adapter_config.json").read_text())
    # the tiny model is a local directory and the alignez run has an edit: either way the base is exported beside
    assert adapter_config["base_model_name_or_path"] == str(directory.resolve() / "base")
    base = AutoModelForCausalLM.from_pretrained(directory / "base")  # as the card says
    tokenizer = AutoTokenizer.from_pretrained(directory / "base")
    torch.testing.assert_close(
        logits(PeftModel.from_pretrained(base, directory), tokenizer), policy_logits[name], rtol=0, atol=1e-5
    )
    monkeypatch.chdir(tmp_path)  # base_model_name_or_path must not depend on the working directory
    torch.testing.assert_close(
        logits(AutoPeftModelForCausalLM.from_pretrained(directory), tokenizer), policy_logits[name], rtol=0, atol=1e-5
    )
    adapter = runs[name] / f"iter_{LAST[name]:03d}" / "adapter"
    assert load_file(directory / "adapter_model.safetensors").keys() == load_file(adapter / "adapter_model.safetensors").keys()


def test_adapter_only_points_at_the_hub_id_of_a_hub_base():
    assert hub_base(load_recipe(None, {"model": {"name": "org/some-model"}})) == "org/some-model"
    assert hub_base(load_recipe(None, {"model": {"name": "org/some-model"}, "init": {"method": "alignez"}})) is None  # edited
    assert hub_base(load_recipe(None, {"model": {"name": "smollm2-135m"}})) is None  # an alias, not a hub id
    assert hub_base(load_recipe(None, {"model": {"name": "./models/mine"}})) is None


def test_model_card_parses_as_hub_metadata(exports, runs):
    card = ModelCard.load(exports["plain", "merge"] / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"selfie", "spa", "dpo", "lora"} <= set(card.data.tags)
    assert card.data.base_model is None and card.data.datasets is None  # a local model and local data: nothing to name
    text = card.text
    assert "# run, iteration 1" in text and "- SPA iterations: 1" in text and "- seed (iteration 0): 8 pairs" in text
    assert "| iter | pairs kept |" in text and "\n| 1 | " in text
    assert "## Evaluation" in text and "- iteration 1: win rate " in text and "(callable:export_judges:length)" in text
    recipe = text.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(recipe) == yaml.safe_load((runs["plain"] / "config.yaml").read_text())

    adapter_card = ModelCard.load(exports["alignez", "adapter"] / "README.md")
    assert adapter_card.data.library_name == "peft" and "alignez" in adapter_card.data.tags
    assert "- SPA iterations: 0" in adapter_card.text and "## Evaluation" not in adapter_card.text
    assert 'from_pretrained(f"{path}/base")' in adapter_card.text


def test_card_names_hub_base_and_datasets(runs, tmp_path):
    from selfie.export.model_card import build_card

    run_dir = tmp_path / "run"
    shutil.copytree(runs["plain"], run_dir)
    config = load_recipe(
        run_dir / "config.yaml", {"model": {"name": "smollm2-135m"}, "data": {"prompts": "HuggingFaceH4/ultrafeedback_binarized"}}
    )
    card = ModelCard(
        str(build_card(RunContext(config, run_dir), 1, adapter_reference=None, output=tmp_path / "out", repo_id="me/model"))
    )
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.datasets == ["HuggingFaceH4/ultrafeedback_binarized"]
    assert 'from_pretrained("me/model")' in card.text


def test_dtype_option_casts_the_weights(runs, tmp_path):
    directory = export_run(runs["plain"], tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((directory / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(directory / "model.safetensors").values()} == {torch.bfloat16}


def test_incomplete_iteration_is_refused_in_one_line(runs, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(runs["plain"] / "config.yaml", run_dir)
    manifest = json.loads((runs["plain"] / "manifest.json").read_text())
    manifest["stages"] = [s for s in manifest["stages"] if s["iteration"] == 0]  # iteration 1 never finished
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    shutil.copytree(runs["plain"] / "iter_000", run_dir / "iter_000")
    assert main(["export", str(run_dir), "--iteration", "1", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"selfie: error: {run_dir}: iteration 1 is not complete (no 'train' stage done in manifest.json); completed: 0"
    ]
    assert not (tmp_path / "out").exists()
    assert main(["export", str(run_dir), "--output", str(tmp_path / "out")]) == 0  # default: the last completed, 0
    assert "# run, iteration 0" in (tmp_path / "out" / "README.md").read_text()


def test_existing_output_is_refused_and_a_failed_export_leaves_nothing(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(runs["plain"]), "--output", str(out)]) == 2
    assert "directory is not empty" in capsys.readouterr().err and (out / "keep.txt").is_file()

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("selfie.export.policy.save_model", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(runs["plain"], out, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "keep.txt").is_file()  # no temporary directory left
    monkeypatch.undo()
    assert main(["export", str(runs["plain"]), "--output", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_push_to_hub_offline_fails_before_any_work(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # no run directory at all: the push check comes first
    assert main(["export", str(tmp_path / "no-run"), "--output", str(out), "--push-to-hub", "me/model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["selfie: error: --push-to-hub: HF_HUB_OFFLINE is set; unset it to push, or export without --push-to-hub"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert main(["export", str(tmp_path / "no-run"), "--output", str(out), "--push-to-hub", "me/model", "--private"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "selfie: error: --push-to-hub: no Hugging Face token; run `hf auth login` or set HF_TOKEN"
    ]
    assert not out.exists()


def test_eval_accepts_an_exported_directory(exports, runs, judges_dir, tmp_path, monkeypatch):
    """The merged export against pi_init + adapter, greedy: the same responses, so every prompt ties."""
    monkeypatch.syspath_prepend(str(judges_dir))
    adapter = runs["plain"] / "iter_001" / "adapter"
    assert (
        main(
            [
                "eval",
                "winrate",
                "--model-a",
                str(exports["plain", "merge"]),
                "--model-b",
                pi_init(runs["plain"]),
                "--adapter-b",
                str(adapter),
                "--judge",
                "callable:export_judges:length",
                "--output",
                str(tmp_path / "rep"),
                "--num-prompts",
                "3",
                "--max-new-tokens",
                "6",
                "--temperature",
                "0",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    scored = [json.loads(line) for line in (tmp_path / "rep" / "scores.jsonl").read_text().splitlines()]
    assert len(scored) == 3 and all(s["response_a"] == s["response_b"] for s in scored)
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["ties"] == 3
