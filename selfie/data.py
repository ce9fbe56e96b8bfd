"""Load, validate and normalise prompt and preference sets; split a prompt pool deterministically.

A source is a hub id, a local .json / .jsonl / .parquet file, a dataset directory (`save_to_disk`'s, or data files
that `datasets.load_dataset` reads), or a built-in name: "demo" (300 prompts) or "demo-seed" (40 preference pairs).
A recipe may give a list of sources instead (config.SourceConfig: load_dataset's name / revision / data_files /
data_dir, a column mapping, and the weight or count of rows taken, drawn with data.shuffle_seed). Rows become
chat messages ending with a user turn, keyed by a stable `prompt_id`; preference rows follow TRL's
conversational preference format. Layouts understood, first match wins:
  prompt        a string, or a list of messages
  instruction   a string, with an optional `input` appended (Alpaca)
  messages      a conversation; a final assistant message is dropped
  chosen        with `rejected` and no prompt column: TRL's implicit prompt (trl.data_utils.maybe_extract_prompt),
                conversations (UltraFeedback-style) or strings (hh-rlhf: the prompt is one user message)
`chosen` / `rejected` are strings or conversations whose last (assistant) message is the response.
The run's own row files (prompt rows with their ids, responses.jsonl) are checked here too, and
split over ranks (`select_shard`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import datasets
from trl.data_utils import is_conversational, maybe_extract_prompt

from selfie.config.schema import SOURCE_COLUMNS, DataConfig, SourceConfig
from selfie.errors import SelfieError
from selfie.io import iter_jsonl, read_text

logger = logging.getLogger(__name__)

BUILTIN = {"demo": "demo_prompts.jsonl", "demo-seed": "demo_seed_pairs.jsonl"}
FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
PROMPT_COLUMNS = ("prompt", "instruction", "messages", "chosen")
LOAD_OPTIONS = ("name", "revision", "data_files", "data_dir")  # what a source hands to datasets.load_dataset
Numbered = tuple[str, int, dict]  # (source, row number in it, normalised row): where a row came from, for errors


class _RowError(Exception):
    """A problem in one row; the caller adds the source and row number."""


def prompt_id_of(messages: list[dict]) -> str:
    """Content hash of a conversation: 16 hex chars of sha256 over its canonical JSON."""
    canonical = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = json.dumps(canonical, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def as_sources(value: str | SourceConfig | Sequence[SourceConfig]) -> list[SourceConfig]:
    """A recipe's data.prompts / data.seed_pairs (a name, or a list of sources) as a list of sources."""
    if isinstance(value, str):
        return [SourceConfig(path=value)]
    return [value] if isinstance(value, SourceConfig) else list(value)


def describe_sources(value: str | SourceConfig | Sequence[SourceConfig]) -> str:
    """How errors and the dry-run plan name a set: its path, or each source with the share a mixture takes."""
    if isinstance(value, str):
        return value
    share = lambda s: f" ({s.weight:g} of it)" if s.weight else f" ({s.count} rows)" if s.count else ""  # noqa: E731
    return " + ".join(f"{s.path}{share(s)}" for s in as_sources(value))


# ---------------------------------------------------------------- reading rows


def load_options(source: SourceConfig) -> dict[str, Any]:
    """The datasets.load_dataset arguments a source sets (name, revision, data_files, data_dir)."""
    return {key: getattr(source, key) for key in LOAD_OPTIONS if getattr(source, key) is not None}


def _read_rows(source: SourceConfig, split: str) -> tuple[str, list[dict]]:
    """(name to show in errors, raw rows with the source's columns mapped) of a source."""
    name, split, options = source.path, source.split or split, load_options(source)
    path = Path(name).expanduser()
    if name in BUILTIN or (not path.is_dir() and (path.suffix in FILE_SUFFIXES or path.exists())):
        if options:
            raise SelfieError(f"{name}: {', '.join(options)} apply to hub datasets and dataset directories, not to a file")
        rows = _read_file(name, path, source.columns)
    elif path.is_dir() and not options and _is_saved(path):
        rows = _to_rows(_pick_split(_load_saved(path), name, split), name, source.columns)
    else:
        rows = _to_rows(_load_dataset(name, split, options, local=path.is_dir()), name, source.columns)
    return name, _mapped(rows, source.columns, name)


def _read_file(name: str, path: Path, columns: dict[str, str]) -> list[dict]:
    if name in BUILTIN:
        return list(iter_jsonl(Path(str(files("selfie") / "resources" / BUILTIN[name]))))
    if not path.is_file():
        raise SelfieError(f"{name}: file not found")
    if path.suffix == ".jsonl":
        return list(iter_jsonl(path))
    if path.suffix == ".json":
        return _read_json(path)
    if path.suffix == ".parquet":
        return _read_parquet(path, columns)
    raise SelfieError(f"{name}: unsupported file type (expected {', '.join(FILE_SUFFIXES)} or a dataset directory)")


def _read_json(path: Path) -> list[dict]:
    """A JSON array of objects, or JSON Lines under a .json name (what `Dataset.to_json` writes)."""
    text = read_text(path)
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


def _to_rows(dataset: Any, name: str, columns: dict[str, str]) -> list[dict]:
    """The rows of a datasets.Dataset, only the columns selfie reads (and those the source maps) converted to Python."""
    present = set(dataset.column_names)
    if not set(PROMPT_COLUMNS) & (present | {columns[c] for c in columns if c in present}):
        raise SelfieError(f"{name}: row 1: {_no_prompt(dataset.column_names)}")
    kept = [c for c in dataset.column_names if c in SOURCE_COLUMNS or c in columns]
    return dataset.select_columns(kept).to_list()


def _mapped(rows: list[dict], columns: dict[str, str], name: str) -> list[dict]:
    """Rows with each mapped source column under its selfie name (a column already holding that name gives way)."""
    if not columns:
        return rows
    for column, target in columns.items():
        if not any(column in row for row in rows):
            raise SelfieError(f"{name}: no column '{column}' to use as '{target}' (data source columns)")
    return [
        {**{k: v for k, v in row.items() if k not in columns.values()}, **{t: row[c] for c, t in columns.items() if c in row}}
        for row in rows
    ]


def _read_parquet(path: Path, columns: dict[str, str]) -> list[dict]:
    try:
        dataset = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise SelfieError(f"{path}: cannot read parquet ({str(e).splitlines()[0]})") from None
    return _to_rows(dataset, str(path), columns)


def _pick_split(dataset: Any, name: str, split: str) -> Any:
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise SelfieError(f"{name}: no split '{split}' (has: {', '.join(dataset)}); set data.split")
        return dataset[split]
    return dataset


def _is_saved(path: Path) -> bool:
    """Whether `path` is what save_to_disk wrote (a Dataset's state file or a DatasetDict's split list)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _load_saved(path: Path) -> Any:
    try:
        return datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise SelfieError(f"{path}: not a saved dataset directory (expected the output of save_to_disk)") from None


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _load_dataset(name: str, split: str, options: dict[str, Any], local: bool) -> Any:
    """datasets.load_dataset of a hub id or a directory of data files, with the source's load options."""
    try:
        return datasets.load_dataset(name, split=split, **options)
    except ValueError as e:
        if "split" in str(e).lower():
            raise SelfieError(f"{name}: no split '{split}' in the dataset; set data.split") from None
        raise SelfieError(f"{name}: datasets.load_dataset refuses it ({_first_line(e)})") from None
    except Exception as e:  # offline, unknown id, gated repo, no data files, ...
        if local:
            raise SelfieError(
                f"{name}: not a saved dataset directory, and datasets.load_dataset cannot read it ({_first_line(e)})"
            ) from None
        raise SelfieError(
            f"{name}: not a local file or directory, and cannot load it from the Hugging Face Hub ({_first_line(e)})"
        ) from None


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


def _implicit_prompt(row: dict) -> dict:
    """A preference row with no prompt column (hh-rlhf, or conversations sharing their first turns): the prompt
    TRL's maybe_extract_prompt finds, its chosen and rejected what follows it."""
    pair = {"chosen": row["chosen"], "rejected": row["rejected"]}
    conversational = [is_conversational({key: value}) for key, value in pair.items()]
    if conversational[0] != conversational[1]:
        raise _RowError("'chosen' and 'rejected' must both be strings or both lists of messages")
    if conversational[0]:
        pair = {key: _messages(value, key) for key, value in pair.items()}
    else:
        pair = {key: _text(value, key) for key, value in pair.items()}
    transcript = None if conversational[0] else _hh_transcript(pair["chosen"], pair["rejected"])
    if transcript is not None:
        return {**row, **transcript}
    extracted = maybe_extract_prompt(pair)
    if not extracted["prompt"]:
        raise _RowError("no prompt: no 'prompt' column, and 'chosen' and 'rejected' do not start alike")
    if not conversational[0]:
        extracted = _at_word_start(extracted)
    return {**row, **extracted}


HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")  # hh-rlhf's turn markers


def _hh_transcript(chosen: str, rejected: str) -> dict | None:
    """hh-rlhf's "\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts as TRL's hh-rlhf script makes them conversations: the
    turns both share, up to the last "Assistant:" before they part, become user and assistant messages (the prompt);
    what each side says after it is its response. None for text that is not such a transcript."""
    shared = chosen[: len(os.path.commonprefix([chosen, rejected]))]
    answers = [m for m in HH_TURN.finditer(shared) if m.group(1) == "Assistant"]
    if not answers:
        return None
    head, start = shared[: answers[-1].start()], answers[-1].end()
    turns = HH_TURN.split(head)  # ["", role, text, role, text, ...]
    if turns[0].strip() or len(turns) < 3:
        return None
    prompt = [
        {"role": "user" if role == "Human" else "assistant", "content": text.strip()}
        for role, text in zip(turns[1::2], turns[2::2])
    ]
    if prompt[-1]["role"] != "user":
        return None
    return {"prompt": prompt, "chosen": chosen[start:].strip(), "rejected": rejected[start:].strip()}


def _at_word_start(pair: dict) -> dict:
    """Text pairs cut where a word starts: TRL's common prefix of "... Sure" and "... Sorry" ends in "S"; the
    whitespace at the cut belongs to neither side once the prompt is a user message of its own."""
    prompt, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
    word = re.search(r"\S+$", prompt)
    if word and chosen[:1].strip() and rejected[:1].strip():  # the cut fell inside a word
        prompt, tail = prompt[: word.start()], prompt[word.start() :]
        chosen, rejected = tail + chosen, tail + rejected
    return {"prompt": prompt.strip(), "chosen": chosen.lstrip(), "rejected": rejected.lstrip()}


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
    elif isinstance(row.get("chosen"), list):  # a conversation with no rejected one to extract the prompt against
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


def _normalised_row(row: dict) -> tuple[dict, dict]:
    """{"prompt_id", "prompt"} of a raw row, plus chosen / rejected where the row is a preference pair."""
    has_prompt = any(row.get(key) is not None for key in ("prompt", "instruction", "messages"))
    if not has_prompt and row.get("chosen") is not None and row.get("rejected") is not None:
        row = _implicit_prompt(row)
    prompt = _prompt(row)
    return row, {"prompt_id": _prompt_id(row, prompt), "prompt": prompt}


def _normalise(source: SourceConfig, split: str, preferences: bool) -> list[Numbered]:
    """Normalised, validated, de-duplicated rows of one source. For preferences a prompt may carry several pairs."""
    name, raw = _read_rows(source, split)
    rows: list[Numbered] = []
    for number, row in enumerate(raw, 1):
        try:
            row, out = _normalised_row(row)
            if preferences:
                out["chosen"], out["rejected"] = _response(row, "chosen"), _response(row, "rejected")
        except _RowError as e:
            raise SelfieError(f"{name}: row {number}: {e}") from None
        rows.append((name, number, out))
    distinct = _distinct(rows)
    if not distinct:
        raise SelfieError(f"{name}: no rows")
    if len(distinct) < len(raw):
        logger.info("%s: dropped %d duplicate rows", name, len(raw) - len(distinct))
    logger.info("%s: %d %s", name, len(distinct), "preference pairs" if preferences else "prompts")
    return distinct


def _distinct(rows: list[Numbered]) -> list[Numbered]:
    """The rows with exact repeats dropped; a prompt_id given to two different prompts is an error naming both rows."""
    first: dict[str, Numbered] = {}
    seen: set[str] = set()
    kept = []
    for name, number, row in rows:
        pid = row["prompt_id"]
        other_name, other_number, other = first.setdefault(pid, (name, number, row))
        if other["prompt"] != row["prompt"]:
            at = f"row {other_number}" if other_name == name else f"{other_name}: row {other_number}"
            raise SelfieError(f"{name}: row {number}: 'prompt_id' {pid!r} repeats {at} with a different prompt")
        content = json.dumps(row, sort_keys=True)
        if content not in seen:
            seen.add(content)
            kept.append((name, number, row))
    return kept


def _draw(rows: list[Numbered], source: SourceConfig, seed: str) -> list[Numbered]:
    """The rows a mixture takes from a source: `count` of them, or the `weight` fraction (rounded down), drawn with
    `seed`, in their own order; all of them when it sets neither."""
    n = source.count if source.count is not None else int(source.weight * len(rows)) if source.weight else len(rows)
    if not 1 <= n <= len(rows):
        asked = f"count {source.count}" if source.count is not None else f"weight {source.weight:g}"
        raise SelfieError(f"{source.path}: {asked} asks for {n} of its {len(rows)} rows")
    if n == len(rows):
        return rows
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))]


def _with_system(row: dict, system_prompt: str) -> dict:
    """The row's prompt opened by the system message, unless it has one (its prompt_id stays the source's)."""
    if row["prompt"][0]["role"] == "system":
        return row
    return {**row, "prompt": [{"role": "system", "content": system_prompt}, *row["prompt"]]}


def _load(sources: Any, split: str, preferences: bool, shuffle_seed: int, system_prompt: str | None) -> list[dict]:
    """The rows of every source (each its own draw of a mixture, seeded by shuffle_seed and its place), merged."""
    sources = as_sources(sources)
    drawn = [
        row
        for i, source in enumerate(sources)
        for row in _draw(_normalise(source, split, preferences), source, f"{shuffle_seed}:{i}")
    ]
    rows = [row for _, _, row in (_distinct(drawn) if len(sources) > 1 else drawn)]
    return [_with_system(row, system_prompt) for row in rows] if system_prompt else rows


def load_prompts(
    source: Any, split: str = DataConfig.split, *, shuffle_seed: int = DataConfig.shuffle_seed, system_prompt: str | None = None
) -> list[dict]:
    """Rows {"prompt_id": str, "prompt": [messages ending with a user turn]}, one per distinct prompt, of a source
    or a list of them (`as_sources`); `system_prompt` opens each prompt that has no system message."""
    return _load(source, split, False, shuffle_seed, system_prompt)


def load_preferences(
    source: Any, split: str = DataConfig.split, *, shuffle_seed: int = DataConfig.shuffle_seed, system_prompt: str | None = None
) -> list[dict]:
    """Rows {"prompt_id", "prompt", "chosen": [assistant message], "rejected": [assistant message]}."""
    return _load(source, split, True, shuffle_seed, system_prompt)


def pool_prompts(d: DataConfig) -> list[dict]:
    """The recipe's prompt pool (data.prompts) as its data: section loads it."""
    return load_prompts(d.prompts, d.split, shuffle_seed=d.shuffle_seed, system_prompt=d.system_prompt)


def seed_preferences(d: DataConfig, seed_rows: list[dict]) -> list[dict]:
    """The labelled seed pairs: data.seed_pairs, else the labels of the pool's seed slice (SPA's split); pairs whose
    chosen and rejected responses are the same are left out (`informative`)."""
    options = {"shuffle_seed": d.shuffle_seed, "system_prompt": d.system_prompt}
    if d.seed_pairs:
        return informative(load_preferences(d.seed_pairs, d.split, **options), describe_sources(d.seed_pairs))
    try:
        pairs = load_preferences(d.prompts, d.split, **options)
    except SelfieError as e:
        raise SelfieError(
            f"with neither data.seed_pairs nor data.seed_judge set, the seed labels come from data.prompts, but {e}"
        ) from None
    ids = {row["prompt_id"] for row in seed_rows}
    pairs = [row for row in pairs if row["prompt_id"] in ids]
    if not pairs:
        raise SelfieError(
            f"data.prompts '{describe_sources(d.prompts)}': no labelled pairs for the seed slice; set data.seed_pairs"
        )
    return informative(pairs, describe_sources(d.prompts))


def informative(pairs: list[dict], where: str) -> list[dict]:
    """The pairs whose chosen and rejected responses differ. A pair of the same response teaches DPO nothing (its
    loss is log 2 whatever the policy, its gradient zero) and hh-rlhf holds a few: they are dropped and counted in
    one log line, as TRL would train on them without a word; a set of nothing else is an error."""
    kept = [row for row in pairs if row["chosen"] != row["rejected"]]
    if not kept:
        raise SelfieError(f"{where}: every one of its {len(pairs)} pairs has the same chosen and rejected response")
    if len(kept) < len(pairs):
        first = next(row["prompt_id"] for row in pairs if row["chosen"] == row["rejected"])
        logger.warning(
            "%s: %d of %d pairs have the same chosen and rejected response (the first: prompt_id %s); they are left out",
            where, len(pairs) - len(kept), len(pairs), first,
        )  # fmt: skip
    return kept


# ---------------------------------------------------------------- splits


@dataclass
class Splits:
    seed: list[dict]
    iterations: list[list[dict]]
    held_out: list[dict]


def count_or_fraction(size: float, pool: int, key: str) -> int:
    """A size < 1 is a fraction of the pool (rounded down), >= 1 a whole count."""
    if isinstance(size, bool) or not isinstance(size, (int, float)) or size < 0:
        raise SelfieError(f"{key}: expected a count or a fraction in [0, 1), got {size!r}")
    if size < 1:
        return int(size * pool)
    if size != int(size):
        raise SelfieError(f"{key}: {size} is neither a whole count nor a fraction below 1")
    return int(size)


def split_prompts(
    rows: list[dict], seed_size: float, iteration_sizes: list[float], shuffle_seed: int = DataConfig.shuffle_seed
) -> Splits:
    """Shuffle with `shuffle_seed`, then cut consecutive slices: seed, one per iteration, the rest held out.

    Asking for more prompts than the pool holds is an error, except that the final iteration's slice
    may come up short (with a warning). SPA: 2000 / [8000, 20000, 30000] of ~60.9k, rest held out.
    """
    pool = list(rows)
    random.Random(shuffle_seed).shuffle(pool)
    n = len(pool)
    seed = count_or_fraction(seed_size, n, "data.seed_size")
    sizes = [count_or_fraction(s, n, f"data.iteration_sizes[{i}]") for i, s in enumerate(iteration_sizes)]
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
