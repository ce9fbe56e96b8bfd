"""A policy's answers to a benchmark's questions, in the file that benchmark reads (`selfie answers`).

  alpaca-eval   questions: AlpacaEval's eval set (a JSON list or JSON Lines of {instruction, [dataset]});
                answers: its model_outputs.json, a JSON list of {instruction, output, generator, [dataset]}
  arena-hard    questions: Arena-Hard-Auto v2.0's question.jsonl ({uid, category, prompt});
                answers: its model_answer/MODEL.jsonl ({uid, ans_id, model, messages, tstamp, metadata})
  mt-bench      questions: FastChat's MT-Bench question.jsonl ({question_id, category, turns});
                answers: its model_answer/MODEL.jsonl ({question_id, answer_id, model_id, choices, tstamp})
Multi-turn questions are answered turn by turn: turn k's prompt holds the earlier turns and the model's own answers.
Everything here is pure; the generating is the caller's (selfie/cli/answers.py).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfie.errors import SelfieError
from selfie.io import atomic_write_json, atomic_write_jsonl, read_json, read_jsonl, read_text

FORMATS = ("alpaca-eval", "arena-hard", "mt-bench")
ID_KEYS = {"alpaca-eval": None, "arena-hard": "uid", "mt-bench": "question_id"}  # None: the row number is the id


@dataclass(frozen=True)
class Question:
    id: str  # unique in its file: the prompt ids the answers are generated under
    turns: list[str]  # the user's messages, answered one after another
    row: dict  # the row as read: what the answer file repeats from it (dataset, uid, question_id)


def read_questions(path: str | Path, fmt: str) -> list[Question]:
    """The questions of a `fmt` question file; a bad row is one error naming the file, the row and the key."""
    rows = _read_rows(Path(path))
    if not rows:
        raise SelfieError(f"{path}: no questions")
    id_key, questions, seen = ID_KEYS[fmt], [], {}
    for n, row in enumerate(rows, 1):
        where = f"{path}: row {n}"
        if not isinstance(row, dict):
            raise SelfieError(f"{where}: expected a JSON object, got {type(row).__name__}")
        question = _QUESTIONS[fmt](row, n, where)
        if question.id in seen:
            raise SelfieError(f"{where}: duplicate {id_key} {row[id_key]!r} (also row {seen[question.id]})")
        seen[question.id] = n
        questions.append(question)
    return questions


def _read_rows(path: Path) -> list[Any]:
    """A JSON list, or JSON Lines (under either suffix: AlpacaEval ships a list, the others JSON Lines)."""
    if path.is_file() and read_text(path).lstrip().startswith("["):
        return read_json(path)
    return read_jsonl(path)


def _text(row: dict, key: str, where: str) -> str:
    if key not in row:
        raise SelfieError(f"{where}: missing key '{key}'")
    if not isinstance(row[key], str) or not row[key].strip():
        raise SelfieError(f"{where}: key '{key}' must be a non-empty string")
    return row[key]


def _alpaca_eval_question(row: dict, n: int, where: str) -> Question:
    if "dataset" in row and not isinstance(row["dataset"], str):
        raise SelfieError(f"{where}: key 'dataset' must be a string")
    return Question(str(n), [_text(row, "instruction", where)], row)


def _arena_hard_question(row: dict, n: int, where: str) -> Question:
    return Question(_text(row, "uid", where), [_text(row, "prompt", where)], row)


def _mt_bench_question(row: dict, n: int, where: str) -> Question:
    for key in ("question_id", "turns"):
        if key not in row:
            raise SelfieError(f"{where}: missing key '{key}'")
    qid, turns = row["question_id"], row["turns"]
    if isinstance(qid, bool) or not isinstance(qid, int | str):
        raise SelfieError(f"{where}: key 'question_id' must be an integer or a string")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise SelfieError(f"{where}: key 'turns' must be a non-empty list of non-empty strings")
    return Question(str(qid), turns, row)


_QUESTIONS = {"alpaca-eval": _alpaca_eval_question, "arena-hard": _arena_hard_question, "mt-bench": _mt_bench_question}


def turn_prompts(questions: list[Question], answers: list[list[str]], turn: int, system_prompt: str | None = None) -> list[dict]:
    """The prompt rows ({prompt_id, prompt}) of turn `turn` (0-based) of each question that has one: the earlier turns
    with the model's own answers to them (`answers[i]`, question i's so far), then this turn's message."""
    rows = []
    for question, answered in zip(questions, answers):
        if turn >= len(question.turns):
            continue
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        for asked, answer in zip(question.turns[:turn], answered):
            messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": question.turns[turn]})
        # a turn of its own id: its per-row sampling seed differs from the first turn's
        rows.append({"prompt_id": question.id if turn == 0 else f"{question.id}#turn{turn + 1}", "prompt": messages})
    return rows


def answer_turns(
    questions: list[Question], generate: Callable[[list[dict], int], list[str]], system_prompt: str | None = None
) -> list[list[str]]:
    """Each question's answers, one per turn: `generate(prompt rows, turn)` answers every question's turn `turn` at once
    (one text per row, in order), so each turn is one batch over the whole file."""
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max(len(q.turns) for q in questions)):
        open_questions = [i for i, q in enumerate(questions) if turn < len(q.turns)]
        texts = generate(turn_prompts(questions, answers, turn, system_prompt), turn)
        for i, text in zip(open_questions, texts, strict=True):
            answers[i].append(text)
    return answers


def answer_id(*parts: str) -> str:
    """A stable id (22 characters, as long as the shortuuid ids the benchmarks' own scripts write): a rerun that gives
    the same answers gives the same ids."""
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()[:22]


# Arena-Hard's style features (utils/add_markdown_info.py::count_markdown_elements in lmarena/arena-hard-auto),
# counted as its gen_answer.py counts them: with the inside of each ``` block removed first.
CODE_BLOCK = re.compile(r"```([^`]*)```")
HEADERS = {f"h{level}": re.compile(rf"^#{{{level}}}\s", re.MULTILINE) for level in range(1, 7)}
LISTS = {"ordered": re.compile(r"^\s*\d+\.\s", re.MULTILINE), "unordered": re.compile(r"^\s*[-*+]\s", re.MULTILINE)}
BOLD = {"**": re.compile(r"\*\*[^*\n]+\*\*"), "__": re.compile(r"__[^_\n]+__")}


def markdown_counts(answer: str) -> dict[str, dict[str, int]]:
    for block in CODE_BLOCK.findall(answer):
        answer = answer.replace(block, "")  # as Arena-Hard does: that text wherever it occurs, the fences kept
    return {
        "header_count": {name: len(p.findall(answer)) for name, p in HEADERS.items()},
        "list_count": {name: len(p.findall(answer)) for name, p in LISTS.items()},
        "bold_count": {name: len(p.findall(answer)) for name, p in BOLD.items()},
    }


@dataclass(frozen=True)
class AnswerSource:
    """What an answer file says of who answered and when."""

    generator: str  # the model's name in the file (the benchmarks' leaderboards show it)
    count_tokens: Callable[[str], int]  # Arena-Hard's token_len: the policy's own tokenizer, not its scripts' tiktoken
    tstamp: float


def _alpaca_eval_row(question: Question, answers: list[str], source: AnswerSource) -> dict:
    dataset = {"dataset": question.row["dataset"]} if "dataset" in question.row else {}
    return {**dataset, "instruction": question.turns[0], "output": answers[0], "generator": source.generator}


def _arena_hard_row(question: Question, answers: list[str], source: AnswerSource) -> dict:
    uid, prompt, answer = question.row["uid"], question.turns[0], answers[0]
    return {
        "uid": uid,
        "ans_id": answer_id(uid, source.generator, answer),
        "model": source.generator,
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": {"answer": answer}}],
        "tstamp": source.tstamp,
        "metadata": {"token_len": source.count_tokens(answer), **markdown_counts(answer)},
    }


def _mt_bench_row(question: Question, answers: list[str], source: AnswerSource) -> dict:
    return {
        "question_id": question.row["question_id"],
        "answer_id": answer_id(question.id, source.generator, *answers),
        "model_id": source.generator,
        "choices": [{"index": 0, "turns": answers}],
        "tstamp": source.tstamp,
    }


_ROWS = {"alpaca-eval": _alpaca_eval_row, "arena-hard": _arena_hard_row, "mt-bench": _mt_bench_row}


def answer_rows(fmt: str, questions: list[Question], answers: list[list[str]], source: AnswerSource) -> list[dict]:
    """The answer file's rows, one per question (`answers[i]`: question i's, one per turn)."""
    return [_ROWS[fmt](q, a, source) for q, a in zip(questions, answers, strict=True)]


def write_answers(path: str | Path, fmt: str, rows: list[dict]) -> None:
    """AlpacaEval reads one JSON list; Arena-Hard and MT-Bench read JSON Lines. Written atomically."""
    if fmt == "alpaca-eval":
        atomic_write_json(path, rows)
    else:
        atomic_write_jsonl(path, rows)
