"""`selfie answers`: each benchmark's answer file holds exactly the keys the benchmark reads, with the answers
`generate_one` gives; MT-Bench's second turn sees the first turn's answer; a run's iteration answers with the run's
own decoding; a bad question file is one line naming the file and the row, before any model loads."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from selfie.cli.main import main
from selfie.config.loader import load_recipe
from selfie.config.schema import EvalOptions, ModelConfig
from selfie.evaluation.answers import Question, answer_turns, markdown_counts, read_questions, turn_prompts
from selfie.evaluation.compare import generate_one
from selfie.models import load_tokenizer
from selfie.run.evaluation import run_eval_options
from selfie.run.rundir import RunContext

from test_loop import write_inputs, write_recipe

QUESTIONS = {
    "alpaca-eval": [
        {"dataset": "helpful_base", "instruction": "write a short poem about the sea", "output": "ignored", "generator": "gpt4"},
        {"instruction": "list three fruits please"},
    ],
    "arena-hard": [
        {"uid": "a1", "category": "hard_prompt", "prompt": "explain why the sun rises in the east"},
        {"uid": "b2", "category": "creative_writing", "prompt": "write a short poem about the sky"},
    ],
    "mt-bench": [
        {"question_id": 81, "category": "writing", "turns": ["write about the sea", "now make it shorter please"]},
        {"question_id": 82, "category": "writing", "turns": ["list three fruits", "which one is yellow"]},
    ],
}
# the keys each benchmark's own scripts read and write (AlpacaEval also keeps the eval set's `dataset`)
KEYS = {
    "alpaca-eval": [{"dataset", "instruction", "output", "generator"}, {"instruction", "output", "generator"}],
    "arena-hard": [{"uid", "ans_id", "model", "messages", "tstamp", "metadata"}] * 2,
    "mt-bench": [{"question_id", "answer_id", "model_id", "choices", "tstamp"}] * 2,
}
DECODING = EvalOptions(max_new_tokens=4, temperature=0.7, seed=3, batch_size=2)
DECODING_FLAGS = ["--max-new-tokens", "4", "--temperature", "0.7", "--seed", "3", "--batch-size", "2"]


def write_questions(path: Path, rows: list) -> Path:
    """A JSON list under .json (AlpacaEval's eval set), JSON Lines otherwise."""
    text = json.dumps(rows) if path.suffix == ".json" else "".join(json.dumps(row) + "\n" for row in rows)
    path.write_text(text)
    return path


def read_answers(path: Path, fmt: str) -> list[dict]:
    if fmt == "alpaca-eval":
        return json.loads(path.read_text())
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_answers(
    model: str,
    adapter: Path | None,
    questions: list[Question],
    tmp: Path,
    settings: str | ModelConfig,
    options: EvalOptions = DECODING,
    system_prompt: str | None = None,
) -> list[list[str]]:
    """generate_one's answers, turn by turn, to the prompt rows `turn_prompts` builds (turn 2 from turn 1's answers)."""
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max(len(q.turns) for q in questions)):
        rows = turn_prompts(questions, answers, turn, system_prompt)
        texts = generate_one(model, adapter, rows, tmp / f"expected_{turn}.jsonl", dtype=settings, **options.sampling())
        for answered, text in zip(answers, texts, strict=True):
            answered.append(text)
    return answers


@pytest.mark.parametrize("fmt", sorted(QUESTIONS))
def test_each_format_holds_the_keys_its_benchmark_reads_and_generate_ones_answers(fmt, tiny_model, tmp_path):
    questions_file = write_questions(tmp_path / ("eval.json" if fmt == "alpaca-eval" else "question.jsonl"), QUESTIONS[fmt])
    output = tmp_path / "answers" / "tiny.jsonl"
    argv = ["answers", "--model", tiny_model, "--questions", str(questions_file), "--format", fmt, "--output", str(output)]
    assert main([*argv, *DECODING_FLAGS]) == 0
    rows = read_answers(output, fmt)
    assert [set(row) for row in rows] == KEYS[fmt]
    questions = read_questions(questions_file, fmt)
    answers = expected_answers(tiny_model, None, questions, tmp_path, DECODING.dtype)
    generator = Path(tiny_model).name  # the default: the model's name
    if fmt == "alpaca-eval":
        assert rows == [
            {
                "dataset": "helpful_base",
                "instruction": QUESTIONS[fmt][0]["instruction"],
                "output": answers[0][0],
                "generator": generator,
            },
            {"instruction": QUESTIONS[fmt][1]["instruction"], "output": answers[1][0], "generator": generator},
        ]
        return
    if fmt == "arena-hard":
        tokenizer = load_tokenizer(tiny_model)
        for row, question, (answer,) in zip(rows, QUESTIONS[fmt], answers, strict=True):
            assert row["uid"] == question["uid"] and row["model"] == generator
            assert row["messages"] == [
                {"role": "user", "content": question["prompt"]},
                {"role": "assistant", "content": {"answer": answer}},
            ]
            assert row["metadata"] == {
                "token_len": len(tokenizer.encode(answer, add_special_tokens=False)),
                **markdown_counts(answer),
            }
    else:
        assert [(r["question_id"], r["model_id"], r["choices"]) for r in rows] == [
            (q["question_id"], generator, [{"index": 0, "turns": a}]) for q, a in zip(QUESTIONS[fmt], answers, strict=True)
        ]
        assert all(len(a) == 2 for a in answers)
    # a rerun writes the same file but for the time stamps: the answer ids are made from the answers
    assert main([*argv, *DECODING_FLAGS, "--generator", generator]) == 0
    rerun = read_answers(output, fmt)
    assert [row | {"tstamp": 0} for row in rerun] == [row | {"tstamp": 0} for row in rows]
    assert len({row.get("ans_id", row.get("answer_id")) for row in rows}) == 2


def test_mt_bench_turn_two_holds_turn_ones_question_and_the_models_own_answer():
    questions = [Question("81", ["first question", "second question"], {}), Question("90", ["only one turn"], {})]
    seen: dict[int, list[dict]] = {}

    def generate(rows: list[dict], turn: int) -> list[str]:
        seen[turn] = rows
        return [f"answer {turn + 1} to {row['prompt_id']}" for row in rows]

    answers = answer_turns(questions, generate, system_prompt="be brief")
    assert answers == [["answer 1 to 81", "answer 2 to 81#turn2"], ["answer 1 to 90"]]
    assert seen[1] == [
        {
            "prompt_id": "81#turn2",
            "prompt": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "answer 1 to 81"},
                {"role": "user", "content": "second question"},
            ],
        }
    ]


def test_arena_hard_style_counts_are_arena_hards_with_code_blocks_left_out():
    text = "# Title\n## Part\n### Sub\n1. one\n2. two\n- dash\n* star\n**bold** and __under__\n```\n# not a header\n- nor a list\n```\n"
    assert markdown_counts(text) == {
        "header_count": {"h1": 1, "h2": 1, "h3": 1, "h4": 0, "h5": 0, "h6": 0},
        "list_count": {"ordered": 2, "unordered": 2},
        "bold_count": {"**": 1, "__": 1},
    }


RUN_SETTINGS = {
    "seed": 5,
    "generate": {"temperature": 0.9, "top_p": 0.8, "max_new_tokens": 40, "batch_size": 3},
    "model": {"dtype": "float32"},
}


def test_a_runs_decoding_settings_are_its_eval_stages():
    options = run_eval_options(load_recipe(None, RUN_SETTINGS))  # no eval: section: the generate: section's
    assert (options.max_new_tokens, options.temperature, options.top_p, options.seed) == (40, 0.9, 0.8, 5)
    assert (options.batch_size, options.dtype) == (3, "float32")
    evaluated = {"judge": "callable:m:f", "max_new_tokens": 7, "temperature": 0.0}
    options = run_eval_options(load_recipe(None, RUN_SETTINGS | {"eval": evaluated}))
    assert (options.max_new_tokens, options.temperature, options.top_p, options.seed) == (7, 0.0, 0.8, 5)


@pytest.fixture(scope="module")
def seed_run(tiny_model, tmp_path_factory) -> Path:
    """A finished tiny run of the seed stage only: its seed, max_new_tokens and system prompt are not the defaults."""
    directory = tmp_path_factory.mktemp("answers-run")
    recipe = write_recipe(directory, tiny_model, *write_inputs(directory))
    run_dir = directory / "tiny-run"
    overrides = ["--num_iterations", "0", "--judge.signal_folds", "0", "--report_to", "[]", "--seed", "7"]
    overrides += ["--generate.max_new_tokens", "5", "--generate.temperature", "0.5", "--data.system_prompt", "be brief"]
    assert main(["run", str(recipe), "--output_dir", str(run_dir), *overrides]) == 0
    return run_dir


def test_a_runs_iteration_answers_with_the_runs_own_decoding_settings(seed_run, tmp_path):
    questions_file = write_questions(tmp_path / "question.jsonl", QUESTIONS["mt-bench"])
    output = tmp_path / "answers.jsonl"
    argv = ["answers", str(seed_run), "--questions", str(questions_file), "--format", "mt-bench", "--output", str(output)]
    assert main(argv) == 0
    ctx = RunContext.load(seed_run)
    options = EvalOptions(max_new_tokens=5, temperature=0.5, seed=7, batch_size=2, dtype=ctx.config.model.dtype)
    assert run_eval_options(ctx.config) == options
    questions = read_questions(questions_file, "mt-bench")
    expected = expected_answers(ctx.pi_init, ctx.adapter(0), questions, tmp_path, ctx.config.model, options, "be brief")
    rows = read_answers(output, "mt-bench")
    assert [row["choices"][0]["turns"] for row in rows] == expected
    assert {row["model_id"] for row in rows} == {"tiny-run-iter0"}  # the default: the run's name and iteration

    # a decoding flag overrides that one setting of the run's
    assert main([*argv, "--max-new-tokens", "2"]) == 0
    shorter = expected_answers(
        ctx.pi_init, ctx.adapter(0), questions, tmp_path, ctx.config.model, replace(options, max_new_tokens=2), "be brief"
    )
    assert [row["choices"][0]["turns"] for row in read_answers(output, "mt-bench")] == shorter != expected


BAD = [
    ("alpaca-eval", "eval.json", [{"instruction": "fine"}, {"output": "no instruction"}], "row 2: missing key 'instruction'"),
    ("alpaca-eval", "eval.json", [{"instruction": "fine"}, "text"], "row 2: expected a JSON object, got str"),
    ("alpaca-eval", "eval.json", [], "no questions"),
    ("arena-hard", "question.jsonl", [{"uid": 3, "prompt": "hi"}], "row 1: key 'uid' must be a non-empty string"),
    (
        "arena-hard",
        "question.jsonl",
        [{"uid": "a", "prompt": "hi"}, {"uid": "a", "prompt": "again"}],
        "row 2: duplicate uid 'a' (also row 1)",
    ),
    ("mt-bench", "question.jsonl", [{"question_id": 81, "turns": []}], "row 1: key 'turns' must be a non-empty list"),
    ("mt-bench", "question.jsonl", [{"turns": ["hi"]}], "row 1: missing key 'question_id'"),
]


@pytest.mark.parametrize("fmt, name, rows, message", BAD, ids=[f"{b[0]}-{b[3][:24]}" for b in BAD])
def test_a_bad_question_row_is_one_line_naming_the_file_and_row_before_any_model_loads(
    fmt, name, rows, message, tmp_path, capsys
):
    questions_file = write_questions(tmp_path / name, rows)
    output = tmp_path / "out" / "answers.json"
    # no such model: a model loaded before the questions were checked would be the error instead
    argv = ["answers", "--model", str(tmp_path / "no-model"), "--questions", str(questions_file), "--format", fmt]
    assert main([*argv, "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"selfie: error: {questions_file}: {message}"), err
    assert not output.exists() and not list(tmp_path.glob("out/.*"))


def test_a_run_directory_with_model_is_refused_in_one_line(seed_run, tmp_path, capsys):
    questions_file = write_questions(tmp_path / "question.jsonl", QUESTIONS["arena-hard"])
    argv = ["answers", str(seed_run), "--model", "m", "--questions", str(questions_file), "--format", "arena-hard"]
    assert main([*argv, "--output", str(tmp_path / "a.jsonl")]) == 2
    assert capsys.readouterr().err == "selfie: error: pass a run directory or --model [--adapter], not both\n"
