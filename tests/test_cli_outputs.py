"""Every verb's output: an unwritable one (under a file, read-only) or one another command is writing is refused in
one line before any model loads; out-of-range numbers on the command line are one-line usage errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from selfie.cli.main import main

from test_loop import write_inputs, write_recipe
from tiny import held_output_lock

RESPONSES = [
    {
        "prompt_id": "a",
        "prompt": [{"role": "user", "content": "hello world"}],
        "responses": ["good morning", "yes thank you"],
        "finished": [True, False],
    }
]


@pytest.fixture(scope="module")
def commands(tiny_model, prev_adapter, tmp_path_factory):
    """verb -> the arguments of a command that would succeed, given where its output goes."""
    directory = tmp_path_factory.mktemp("verbs")
    recipe = write_recipe(directory, tiny_model, *write_inputs(directory))
    responses = directory / "responses.jsonl"
    responses.write_text("".join(json.dumps(row) + "\n" for row in RESPONSES))
    (directory / "verb_judges.py").write_text("def length(prompt, response):\n    return float(len(response))\n")
    questions = directory / "questions.jsonl"
    questions.write_text(json.dumps({"uid": "q1", "category": "hard_prompt", "prompt": "hello world"}) + "\n")
    return {
        "run": lambda out: ["run", str(recipe), "--output_dir", str(out)],
        "generate": lambda out: [
            "generate",
            "--model",
            tiny_model,
            "--prompts",
            "demo",
            "--output",
            str(out / "responses.jsonl"),
            "--max-new-tokens",
            "2",
        ],
        "judge": lambda out: [
            "judge",
            "--model",
            tiny_model,
            "--adapter",
            str(prev_adapter),
            "--responses",
            str(responses),
            "--output",
            str(out / "judgments.jsonl"),
        ],
        "eval": lambda out: [
            "eval",
            "accuracy",
            "--judge",
            "callable:verb_judges:length",
            "--preferences",
            "demo-seed",
            "--num-pairs",
            "2",
            "--output",
            str(out),
        ],
        "answers": lambda out: [
            "answers",
            "--model",
            tiny_model,
            "--questions",
            str(questions),
            "--format",
            "arena-hard",
            "--output",
            str(out / "answers.jsonl"),
            "--max-new-tokens",
            "2",
        ],
        "dir": directory,
    }


def one_line_error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("selfie: error: ") and "Traceback" not in err, err
    return err


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may write to: mode 555 for a user, a read-only tmpfs for root (who ignores modes)."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


VERBS = ["run", "generate", "judge", "eval", "answers"]


@pytest.mark.parametrize("verb", VERBS)
def test_an_output_under_a_file_is_one_line(verb, commands, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(commands["dir"]))
    (tmp_path / "a-file").write_text("x")
    err = one_line_error(commands[verb](tmp_path / "a-file" / "out"), capsys)
    assert "a-file is a file, not a directory" in err
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


@pytest.mark.parametrize("verb", VERBS)
def test_a_read_only_output_is_one_line(verb, commands, read_only_dir, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(commands["dir"]))
    err = one_line_error(commands[verb](read_only_dir / "out"), capsys)
    assert f"cannot be written: {read_only_dir} is read-only" in err


@pytest.mark.parametrize("verb", ["generate", "judge", "eval", "answers"])
def test_a_second_command_on_the_same_output_is_refused(verb, commands, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(commands["dir"]))
    argv = commands[verb](tmp_path / "out")
    output = argv[argv.index("--output") + 1]
    with held_output_lock(output) as holder:
        err = one_line_error(argv, capsys)
    assert f"{Path(output).name}: output is in use by pid {holder.pid}; wait for it or stop it" in err
    assert not Path(output).exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["eval", "accuracy", "--judge", "callable:m:f", "--preferences", "demo-seed", "--output", "o", "--n-boot", "0"],
            "argument --n-boot: expected >= 1, got 0",
        ),
        (
            [
                "eval",
                "winrate",
                "--judge",
                "callable:m:f",
                "--model-a",
                "a",
                "--model-b",
                "b",
                "--output",
                "o",
                "--num-prompts",
                "-1",
            ],
            "argument --num-prompts: expected >= 0, got -1",
        ),
        (
            ["generate", "--model", "m", "--prompts", "demo", "--output", "o", "--top-p", "0"],
            r"argument --top-p: expected a value in (0, 1], got 0",
        ),
        (
            ["generate", "--model", "m", "--prompts", "demo", "--output", "o", "--max-new-tokens", "0"],
            "argument --max-new-tokens: expected >= 1",
        ),
        (
            ["generate", "--model", "m", "--prompts", "demo", "--output", "o", "--temperature", "-1"],
            "argument --temperature: expected >= 0",
        ),
        (
            ["generate", "--model", "m", "--prompts", "demo", "--output", "o", "--num-responses", "two"],
            "argument --num-responses: expected int, got 'two'",
        ),
        (
            ["judge", "--model", "m", "--adapter", "a", "--responses", "r", "--output", "o", "--beta", "0"],
            "argument --beta: expected > 0",
        ),
        (
            ["judge", "--model", "m", "--adapter", "a", "--responses", "r", "--output", "o", "--token-budget", "0"],
            "argument --token-budget: expected >= 1",
        ),
    ],
)
def test_out_of_range_numbers_are_one_line_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err and "(usage: selfie " in err, err


# ---- a quiet command line that says how to use it ------------------------------------------------

NOISE = ("Failed to load CPU gemm_4bit_forward", "FutureWarning", "DeprecationWarning", "[INFO] Running in WANDB")


def selfie_process(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"WANDB_MODE": "offline"}
    return subprocess.run(["selfie", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_help_and_a_dry_run_print_no_third_party_noise_unless_verbose(commands, tmp_path):
    dry_run = commands["run"](tmp_path / "run") + ["--dry-run"]
    for args in (["--help"], ["run", "--help"], dry_run):
        done = selfie_process(*args)
        assert done.returncode == 0, done.stderr
        assert not [noise for noise in NOISE if noise in done.stdout + done.stderr], (args, done.stderr[-2000:])
    verbose = selfie_process("-v", *dry_run)
    assert verbose.returncode == 0 and "Failed to load CPU gemm_4bit_forward" in verbose.stderr  # -v shows it all


def test_run_help_explains_overrides_and_where_the_keys_are():
    out = selfie_process("run", "--help").stdout
    assert "--section.key value" in out and "--train.beta 0.2" in out and "docs/RECIPES.md" in out


def test_status_without_a_run_lists_the_runs_under_runs_or_says_what_to_pass(commands, tmp_path):
    none = selfie_process("status", cwd=tmp_path)
    assert none.returncode == 2 and none.stderr.strip().splitlines()[-1].endswith(
        "pass one: selfie status RUN_DIR (a recipe's output_dir)"
    )
    assert main([*commands["run"](tmp_path / "runs" / "tiny"), "--num_iterations", "0", "--judge.signal_folds", "0"]) == 0
    listed = selfie_process("status", cwd=tmp_path)
    assert listed.returncode == 0 and listed.stdout.strip() == "runs/tiny  (1/1 stages done, 0 iterations planned)"
