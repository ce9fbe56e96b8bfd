"""Load, validate and normalise prompt and preference sets; split a prompt pool deterministically.

A source is a hub id, a local .json / .jsonl / .parquet file, a `save_to_disk` directory, or a
built-in name: "demo" (300 prompts) or "demo-seed" (40 preference pairs). Rows become chat
messages ending with a user turn, keyed by a stable `prompt_id`; preference rows follow TRL's
conversational preference format. Layouts understood, first match wins:
  prompt        a string, or a list of messages
  instruction   a string, with an optional `input` appended (Alpaca)
  messages      a conversation; a final assistant message is dropped
  chosen        with no prompt column: the conversation before its last message (TRL's implicit prompt)
`chosen` / `rejected` are strings or conversations whose last (assistant) message is the response.
The run's own row files (prompt rows with their ids, responses.jsonl) are checked here too, and
split over ranks (`select_shard`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from selfie.errors import SelfieError
from selfie.io import iter_jsonl

logger = logging.getLogger(__name__)

BUILTIN = {"demo": "demo_prompts.jsonl", "demo-seed": "demo_seed_pairs.jsonl"}
FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
# Columns we read; the rest (scores, metadata, model names) are dropped before converting to Python.
KNOWN_COLUMNS = ("prompt_id", "id", "prompt", "instruction", "input", "messages", "chosen", "rejected")
PROMPT_COLUMNS = ("prompt", "instruction", "messages", "chosen")


class _RowError(Exception):
    """A problem in one row; the caller adds the source and row number."""


def prompt_id_of(messages: list[dict]) -> str:
    """Content hash of a conversation: 16 hex chars of sha256 over its canonical JSON."""
    canonical = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = json.dumps(canonical, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------- reading rows


def _read_rows(source: str, split: str) -> tuple[str, list[dict]]:
    """(name to show in errors, raw rows) of a source."""
    if source in BUILTIN:
        path = files("selfie") / "resources" / BUILTIN[source]
        return source, list(iter_jsonl(Path(str(path))))
    path = Path(source).expanduser()
    if path.is_dir():
        return source, _read_saved(path, split)
    if path.suffix in FILE_SUFFIXES or path.exists():
        if not path.is_file():
            raise SelfieError(f"{source}: file not found")
        if path.suffix == ".jsonl":
            return source, list(iter_jsonl(path))
        if path.suffix == ".json":
            return source, _read_json(path)
        if path.suffix == ".parquet":
            return source, _read_parquet(path)
        raise SelfieError(f"{source}: unsupported file type (expected {', '.join(FILE_SUFFIXES)} or a saved dataset directory)")
    return source, _read_hub(source, split)


def _read_json(path: Path) -> list[dict]:
    """A JSON array of objects, or JSON Lines under a .json name (what `Dataset.to_json` writes)."""
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        return list(iter_jsonl(path))
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise SelfieError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise SelfieError(f"{path}: row {i}: expected a JSON object, got {type(row).__name__}")
    return rows


def _to_rows(dataset: Any, name: str) -> list[dict]:
    if not set(PROMPT_COLUMNS) & set(dataset.column_names):
        raise SelfieError(f"{name}: row 1: {_no_prompt(dataset.column_names)}")
    return dataset.select_columns([c for c in KNOWN_COLUMNS if c in dataset.column_names]).to_list()


def _read_parquet(path: Path) -> list[dict]:
    import datasets

    try:
        dataset = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise SelfieError(f"{path}: cannot read parquet ({str(e).splitlines()[0]})") from None
    return _to_rows(dataset, str(path))


def _pick_split(dataset: Any, name: str, split: str) -> Any:
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise SelfieError(f"{name}: no split '{split}' (has: {', '.join(dataset)}); set data.split")
        return dataset[split]
    return dataset


def _read_saved(path: Path, split: str) -> list[dict]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise SelfieError(f"{path}: not a saved dataset directory (expected the output of save_to_disk)") from None
    return _to_rows(_pick_split(dataset, str(path), split), str(path))


def _read_hub(source: str, split: str) -> list[dict]:
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise SelfieError(f"{source}: no split '{split}' on the Hub dataset; set data.split") from None
        raise SelfieError(f"{source}: cannot load from the Hugging Face Hub ({str(e).splitlines()[0]})") from None
    except Exception as e:  # offline, unknown id, gated repo, ...
        raise SelfieError(
            f"{source}: not a local file or directory, and cannot load it from the Hugging Face Hub "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    return _to_rows(dataset, source)


# ---------------------------------------------------------------- normalising one row


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise _RowError(f"'{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _RowError(f"'{key}' is empty")
    return value


def _messages(value: Any, key: str) -> list[dict]:
    if not isinstance(value, list):
        raise _RowError(f"'{key}' must be a string or a list of messages, got {type(value).__name__}")
    if not value:
        raise _RowError(f"'{key}' is empty")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise _RowError(f"'{key}[{i}]' must be a message {{'role': str, 'content': str}}, got {m!r:.60}")
        out.append({"role": m["role"], "content": _text(m["content"], f"{key}[{i}].content")})
    return out


def _no_prompt(columns: Any) -> str:
    present = ", ".join(f"'{c}'" for c in columns) or "none"
    return f"no prompt: expected a 'prompt', 'instruction' or 'messages' column (columns: {present})"


def _prompt(row: dict) -> list[dict]:
    if row.get("prompt") is not None:
        value, key = row["prompt"], "prompt"
        messages = [{"role": "user", "content": _text(value, key)}] if isinstance(value, str) else _messages(value, key)
    elif row.get("instruction") is not None:
        key, text = "instruction", _text(row["instruction"], "instruction")
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise _RowError(f"'input' must be a string, got {type(extra).__name__}")
        messages = [{"role": "user", "content": f"{text}\n\n{extra}" if extra and extra.strip() else text}]
    elif row.get("messages") is not None:
        key, messages = "messages", _messages(row["messages"], "messages")
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
    elif isinstance(row.get("chosen"), list):
        key, messages = "chosen", _messages(row["chosen"], "chosen")[:-1]
    else:
        raise _RowError(_no_prompt(row))
    if not messages or messages[-1]["role"] != "user":
        raise _RowError(f"'{key}': the prompt must end with a user message")
    return messages


def _response(row: dict, key: str) -> list[dict]:
    """`chosen` / `rejected` as a one-message assistant list (TRL conversational format)."""
    if row.get(key) is None:
        raise _RowError(f"no '{key}' column: a preference set needs 'chosen' and 'rejected'")
    value = row[key]
    if isinstance(value, str):
        return [{"role": "assistant", "content": _text(value, key)}]
    last = _messages(value, key)[-1]  # a full conversation: the prompt turns are dropped
    if last["role"] != "assistant":
        raise _RowError(f"'{key}' must end with an assistant message")
    return [last]


def _prompt_id(row: dict, messages: list[dict]) -> str:
    for key in ("prompt_id", "id"):
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise _RowError(f"'{key}' must be a string or an integer, got {type(value).__name__}")
        if not str(value).strip():
            raise _RowError(f"'{key}' is empty")
        return str(value)
    return prompt_id_of(messages)


def _normalise(source: str, split: str, preferences: bool) -> list[dict]:
    """Normalised, validated, de-duplicated rows. For preferences a prompt may carry several pairs."""
    name, raw = _read_rows(source, split)
    rows: list[dict] = []
    first_row: dict[str, tuple[int, list[dict]]] = {}  # prompt_id -> (row number, prompt)
    seen: set[str] = set()
    for number, row in enumerate(raw, 1):
        try:
            prompt = _prompt(row)
            out = {"prompt_id": _prompt_id(row, prompt), "prompt": prompt}
            if preferences:
                out["chosen"], out["rejected"] = _response(row, "chosen"), _response(row, "rejected")
        except _RowError as e:
            raise SelfieError(f"{name}: row {number}: {e}") from None
        pid = out["prompt_id"]
        if pid in first_row and first_row[pid][1] != prompt:
            raise SelfieError(
                f"{name}: row {number}: 'prompt_id' {pid!r} repeats row {first_row[pid][0]} with a different prompt"
            )
        first_row.setdefault(pid, (number, prompt))
        content = json.dumps(out, sort_keys=True)
        if content not in seen:
            seen.add(content)
            rows.append(out)
    if not rows:
        raise SelfieError(f"{name}: no rows")
    if len(rows) < len(raw):
        logger.info("%s: dropped %d duplicate rows", name, len(raw) - len(rows))
    logger.info("%s: %d %s", name, len(rows), "preference pairs" if preferences else "prompts")
    return rows


def load_prompts(source: str, split: str = "train") -> list[dict]:
    """Rows {"prompt_id": str, "prompt": [messages ending with a user turn]}, one per distinct prompt."""
    return _normalise(source, split, preferences=False)


def load_preferences(source: str, split: str = "train") -> list[dict]:
    """Rows {"prompt_id", "prompt", "chosen": [assistant message], "rejected": [assistant message]}."""
    return _normalise(source, split, preferences=True)


def seed_slice_pairs(source: str, split: str, seed_rows: list[dict]) -> list[dict]:
    """The labelled pairs of the pool's seed slice (SPA's split): the seed set when the recipe names none."""
    try:
        pairs = load_preferences(source, split)
    except SelfieError as e:
        raise SelfieError(
            f"with neither data.seed_pairs nor data.seed_judge set, the seed labels come from data.prompts, but {e}"
        ) from None
    ids = {row["prompt_id"] for row in seed_rows}
    pairs = [row for row in pairs if row["prompt_id"] in ids]
    if not pairs:
        raise SelfieError(f"data.prompts '{source}': no labelled pairs for the seed slice; set data.seed_pairs")
    return pairs


# ---------------------------------------------------------------- splits


@dataclass
class Splits:
    seed: list[dict]
    iterations: list[list[dict]]
    held_out: list[dict]


def _count(size: float, pool: int, key: str) -> int:
    """A size < 1 is a fraction of the pool (rounded down), >= 1 a whole count."""
    if isinstance(size, bool) or not isinstance(size, (int, float)) or size < 0:
        raise SelfieError(f"{key}: expected a count or a fraction in [0, 1), got {size!r}")
    if size < 1:
        return int(size * pool)
    if size != int(size):
        raise SelfieError(f"{key}: {size} is neither a whole count nor a fraction below 1")
    return int(size)


def split_prompts(rows: list[dict], seed_size: float, iteration_sizes: list[float], shuffle_seed: int = 42) -> Splits:
    """Shuffle with `shuffle_seed`, then cut consecutive slices: seed, one per iteration, the rest held out.

    Asking for more prompts than the pool holds is an error, except that the final iteration's slice
    may come up short (with a warning). SPA: 2000 / [8000, 20000, 30000] of ~60.9k, rest held out.
    """
    pool = list(rows)
    random.Random(shuffle_seed).shuffle(pool)
    n = len(pool)
    seed = _count(seed_size, n, "data.seed_size")
    sizes = [_count(s, n, f"data.iteration_sizes[{i}]") for i, s in enumerate(iteration_sizes)]
    wanted = seed + sum(sizes)
    if wanted > n:
        before_last = wanted - sizes[-1] if sizes else wanted
        if before_last >= n:
            raise SelfieError(
                f"data.seed_size + data.iteration_sizes = {seed} + {sizes} = {wanted} prompts, but the pool has only {n}"
            )
        logger.warning(
            "data.iteration_sizes: the final iteration gets %d prompts, not %d (pool of %d, %d asked)",
            n - before_last,
            sizes[-1],
            n,
            wanted,
        )  # its slice below is cut at the end of the pool
    seed_rows, start, iterations = pool[:seed], seed, []
    for size in sizes:
        iterations.append(pool[start : start + size])
        start += size
    return Splits(seed=seed_rows, iterations=iterations, held_out=pool[start:])


# ---------------------------------------------------------------- rows of the run's own files and shards


def select_shard(rows: Sequence[dict], shard: tuple[int, int]) -> list[dict]:
    """Rows i (in prompt_id order) with i % world == rank."""
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard {shard}: need 0 <= rank < world")
    return [row for i, row in enumerate(sorted(rows, key=lambda r: r["prompt_id"])) if i % world == rank]


def check_prompt_rows(rows: Sequence[dict], source: str) -> None:
    """Each row needs a unique string prompt_id and a non-empty list of {role, content} messages."""
    seen: set[str] = set()
    for n, row in enumerate(rows, 1):
        where = f"{source}: row {n}"
        for key in ("prompt_id", "prompt"):
            if key not in row:
                raise SelfieError(f"{where}: missing key '{key}'")
        if not isinstance(row["prompt_id"], str):
            raise SelfieError(f"{where}: key 'prompt_id' must be a string")
        if row["prompt_id"] in seen:
            raise SelfieError(f"{where}: duplicate prompt_id '{row['prompt_id']}'")
        seen.add(row["prompt_id"])
        prompt = row["prompt"]
        if (
            not isinstance(prompt, list)
            or not prompt
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
            )
        ):
            raise SelfieError(f"{where}: key 'prompt' must be a non-empty list of {{role, content}} messages")


def check_response_rows(rows: Sequence[dict], source: str) -> None:
    """responses.jsonl rows: prompt rows plus equally long `responses` (str) and `finished` (bool) lists."""
    check_prompt_rows(rows, source)
    for n, row in enumerate(rows, 1):
        for key, kind in (("responses", str), ("finished", bool)):
            if key not in row:
                raise SelfieError(f"{source}: row {n}: missing key '{key}'")
            if not isinstance(row[key], list) or not row[key] or not all(isinstance(v, kind) for v in row[key]):
                raise SelfieError(f"{source}: row {n}: key '{key}' must be a non-empty list of {kind.__name__}")
        if len(row["responses"]) != len(row["finished"]):
            raise SelfieError(f"{source}: row {n}: 'responses' and 'finished' have different lengths")
