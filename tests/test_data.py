"""Loading, validation, normalisation and splitting of prompt and preference sets; the built-in demo data."""

import json
import logging
import re

import datasets
import pytest

from selfie.data import Splits, load_preferences, load_prompts, prompt_id_of, split_prompts
from selfie.errors import SelfieError

USER = lambda text: {"role": "user", "content": text}  # noqa: E731
ASSISTANT = lambda text: {"role": "assistant", "content": text}  # noqa: E731


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------ layouts


def test_ultrafeedback_layout_strips_the_user_turn(tmp_path):
    src = write_jsonl(
        tmp_path / "uf.jsonl",
        [
            {
                "prompt_id": "abc",
                "prompt": "Name a colour.",
                "score_chosen": 8.0,
                "chosen": [USER("Name a colour."), ASSISTANT("Blue.")],
                "rejected": [USER("Name a colour."), ASSISTANT("Seven.")],
                "messages": [USER("Name a colour."), ASSISTANT("Blue.")],
            }
        ],
    )
    assert load_preferences(src) == [
        {
            "prompt_id": "abc",
            "prompt": [USER("Name a colour.")],
            "chosen": [ASSISTANT("Blue.")],
            "rejected": [ASSISTANT("Seven.")],
        }
    ]
    assert load_prompts(src) == [{"prompt_id": "abc", "prompt": [USER("Name a colour.")]}]


def test_string_pairs_and_message_list_prompt(tmp_path):
    prompt = [{"role": "system", "content": "Be brief."}, USER("Hi"), ASSISTANT("Hello!"), USER("2+2?")]
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": prompt, "chosen": "4", "rejected": "5"}])
    (row,) = load_preferences(src)
    assert row["prompt"] == prompt and row["prompt_id"] == prompt_id_of(prompt)
    assert (row["chosen"], row["rejected"]) == ([ASSISTANT("4")], [ASSISTANT("5")])


def test_implicit_prompt_from_full_conversations(tmp_path):
    """TRL's implicit-prompt layout: no prompt column, chosen/rejected share the conversation before the response."""
    src = write_jsonl(
        tmp_path / "hh.jsonl", [{"chosen": [USER("Hi"), ASSISTANT("Hello!")], "rejected": [USER("Hi"), ASSISTANT("Go away.")]}]
    )
    (row,) = load_preferences(src)
    assert row["prompt"] == [USER("Hi")] and row["chosen"] == [ASSISTANT("Hello!")]


def test_alpaca_and_chat_layouts(tmp_path):
    src = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
            {"instruction": "Say hi.", "input": ""},
            {"messages": [USER("Q1"), ASSISTANT("A1"), USER("Q2"), ASSISTANT("A2")]},
            {"messages": [USER("Only a question")]},
            {"id": 17, "prompt": "Has an integer id."},
        ],
    )
    rows = load_prompts(src)
    assert [r["prompt"] for r in rows] == [
        [USER("Translate to French.\n\ncat")],
        [USER("Say hi.")],
        [USER("Q1"), ASSISTANT("A1"), USER("Q2")],
        [USER("Only a question")],
        [USER("Has an integer id.")],
    ]
    assert rows[0]["prompt_id"] == prompt_id_of(rows[0]["prompt"]) and rows[4]["prompt_id"] == "17"


def test_json_parquet_and_saved_datasets_load_the_same(tmp_path):
    rows = [
        {"prompt": f"Question {i}?", "chosen": [USER(f"Question {i}?"), ASSISTANT(f"Answer {i}.")], "rejected": f"No idea {i}."}
        for i in range(5)
    ]
    expected = load_preferences(write_jsonl(tmp_path / "a.jsonl", rows))
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=1))
    ds = datasets.Dataset.from_list(rows)
    ds.to_json(str(tmp_path / "lines.json"))  # datasets writes JSON Lines, even under a .json name
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds.select(range(2)), "test": ds}).save_to_disk(str(tmp_path / "dict"))
    for source in ("a.json", "lines.json", "a.parquet", "saved"):
        assert load_preferences(str(tmp_path / source)) == expected, source
    assert load_preferences(str(tmp_path / "dict"), split="test") == expected
    assert load_prompts(str(tmp_path / "dict")) == [{"prompt_id": r["prompt_id"], "prompt": r["prompt"]} for r in expected[:2]]
    with pytest.raises(SelfieError, match=r"dict: no split 'validation' \(has: train, test\)"):
        load_prompts(str(tmp_path / "dict"), split="validation")


# ------------------------------------------------------------------ ids and de-duplication


def test_prompt_id_is_stable_and_content_based():
    a = [USER("Hello")]
    assert prompt_id_of(a) == prompt_id_of([{"content": "Hello", "role": "user", "extra": 1}])
    assert len(prompt_id_of(a)) == 16 and int(prompt_id_of(a), 16) >= 0
    assert prompt_id_of(a) != prompt_id_of([USER("Hello ")]) != prompt_id_of([{"role": "system", "content": "Hello"}])
    # pinned: an id must never change between versions, or resumed runs and seed-slice lookups break
    assert prompt_id_of(a) == "013cf0c05f083773"


def test_identical_rows_are_deduplicated_keeping_the_first(tmp_path, caplog):
    src = write_jsonl(
        tmp_path / "dup.jsonl",
        [{"prompt": "A"}, {"prompt": "B"}, {"prompt": "A"}, {"prompt_id": "x", "prompt": "C"}, {"prompt_id": "x", "prompt": "C"}],
    )
    with caplog.at_level(logging.INFO, logger="selfie.data"):
        rows = load_prompts(src)
    assert [r["prompt"][0]["content"] for r in rows] == ["A", "B", "C"]
    assert "dropped 2 duplicate rows" in caplog.text


def test_several_pairs_for_one_prompt_are_kept(tmp_path):
    src = write_jsonl(
        tmp_path / "multi.jsonl",
        [
            {"prompt": "Q", "chosen": "good", "rejected": "bad"},
            {"prompt": "Q", "chosen": "good", "rejected": "worse"},
            {"prompt": "Q", "chosen": "good", "rejected": "bad"},
        ],
    )
    assert [r["rejected"][0]["content"] for r in load_preferences(src)] == ["bad", "worse"]
    assert len(load_prompts(src)) == 1


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "  "}, "row 2: 'prompt' is empty"),
        ({"prompt": 5}, "row 2: 'prompt' must be a string or a list of messages, got int"),
        ({"prompt": []}, "row 2: 'prompt' is empty"),
        ({"prompt": [{"role": "user"}]}, "row 2: 'prompt[0]' must be a message"),
        ({"prompt": [USER("Q"), ASSISTANT("A")]}, "row 2: 'prompt': the prompt must end with a user message"),
        ({"prompt": [USER(3)]}, "row 2: 'prompt[0].content' must be a string, got int"),
        ({"text": "Q"}, "row 2: no prompt: expected a 'prompt', 'instruction' or 'messages' column (columns: 'text')"),
        ({"instruction": "Q", "input": 4}, "row 2: 'input' must be a string, got int"),
        ({"messages": [ASSISTANT("A")]}, "row 2: 'messages': the prompt must end with a user message"),
        ({"prompt_id": "p1", "prompt": "Different"}, "row 2: 'prompt_id' 'p1' repeats row 1 with a different prompt"),
        ({"prompt_id": 1.5, "prompt": "Q"}, "row 2: 'prompt_id' must be a string or an integer, got float"),
    ],
)
def test_bad_prompt_rows_name_file_row_and_key(tmp_path, row, message):
    src = write_jsonl(tmp_path / "bad.jsonl", [{"prompt_id": "p1", "prompt": "Fine"}, row])
    with pytest.raises(SelfieError) as e:
        load_prompts(src)
    assert str(e.value).startswith(f"{src}: {message}")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "Q", "rejected": "no"}, "row 1: no 'chosen' column"),
        ({"prompt": "Q", "chosen": "", "rejected": "no"}, "row 1: 'chosen' is empty"),
        ({"prompt": "Q", "chosen": "yes", "rejected": 0}, "row 1: 'rejected' must be a string or a list of messages, got int"),
        ({"prompt": "Q", "chosen": [USER("Q")], "rejected": "no"}, "row 1: 'chosen' must end with an assistant message"),
    ],
)
def test_bad_preference_rows(tmp_path, row, message):
    src = write_jsonl(tmp_path / "prefs.jsonl", [row])
    with pytest.raises(SelfieError, match="^" + re.escape(f"{src}: {message}")):
        load_preferences(src)


def test_bad_sources(tmp_path):
    with pytest.raises(SelfieError, match="missing.jsonl: file not found"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SelfieError, match="notes.txt: unsupported file type"):
        load_prompts(str(tmp_path / "notes.txt"))
    (tmp_path / "broken.parquet").write_text("junk")
    with pytest.raises(SelfieError, match="broken.parquet: cannot read parquet"):
        load_prompts(str(tmp_path / "broken.parquet"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(SelfieError, match="dir: not a saved dataset directory"):
        load_prompts(str(tmp_path / "dir"))
    (tmp_path / "arr.json").write_text('[{"prompt": "ok"}, "oops"]')
    with pytest.raises(SelfieError, match=r"arr.json: row 2: expected a JSON object, got str"):
        load_prompts(str(tmp_path / "arr.json"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SelfieError, match="empty.jsonl: no rows"):
        load_prompts(str(tmp_path / "empty.jsonl"))
    datasets.Dataset.from_list([{"text": "a"}]).to_parquet(str(tmp_path / "text.parquet"))
    with pytest.raises(SelfieError, match=r"text.parquet: row 1: no prompt: .*\(columns: 'text'\)"):
        load_prompts(str(tmp_path / "text.parquet"))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(SelfieError, match="^someone/no-such-dataset: not a local file or directory, and cannot load it"):
        load_prompts("someone/no-such-dataset")


# ------------------------------------------------------------------ splits


def pool(n):
    return [{"prompt_id": f"p{i}", "prompt": [USER(f"q{i}")]} for i in range(n)]


def ids(rows):
    return [r["prompt_id"] for r in rows]


def test_spa_scheme_on_a_60900_prompt_pool():
    rows = pool(60_900)
    s = split_prompts(rows, 2000, [8000, 20000, 30000], shuffle_seed=42)
    assert [len(s.seed), *map(len, s.iterations), len(s.held_out)] == [2000, 8000, 20000, 30000, 900]
    parts = [ids(s.seed), *map(ids, s.iterations), ids(s.held_out)]
    assert sorted(sum(parts, [])) == sorted(ids(rows))  # a partition: every prompt exactly once
    assert ids(s.seed) != ids(rows[:2000])  # shuffled
    again = split_prompts(pool(60_900), 2000.0, [8000.0, 20000.0, 30000.0], shuffle_seed=42)  # the recipe's floats
    assert [ids(again.seed), *map(ids, again.iterations), ids(again.held_out)] == parts
    other = split_prompts(rows, 2000, [8000, 20000, 30000], shuffle_seed=43)
    assert ids(other.seed) != ids(s.seed)


def test_splits_are_pinned_to_the_shuffle():
    """random.Random(seed).shuffle of the input order, then consecutive slices."""
    s = split_prompts(pool(10), 2, [3, 3], shuffle_seed=42)
    assert s == Splits(
        seed=[pool(10)[i] for i in (7, 3)],
        iterations=[[pool(10)[i] for i in (2, 8, 5)], [pool(10)[i] for i in (6, 9, 4)]],
        held_out=[pool(10)[i] for i in (0, 1)],
    )


def test_fraction_sizes_round_down():
    s = split_prompts(pool(99), 0.1, [0.25, 0.5])
    assert [len(s.seed), *map(len, s.iterations), len(s.held_out)] == [9, 24, 49, 17]
    s = split_prompts(pool(50), 0, [16, 16])  # the demo recipe: seed pairs come from elsewhere
    assert [len(s.seed), *map(len, s.iterations), len(s.held_out)] == [0, 16, 16, 18]


def test_only_the_final_iteration_may_come_up_short(caplog):
    with caplog.at_level(logging.WARNING, logger="selfie.data"):
        s = split_prompts(pool(100), 10, [50, 60])
    assert [len(s.seed), *map(len, s.iterations), len(s.held_out)] == [10, 50, 40, 0]
    assert "final iteration gets 40 prompts, not 60" in caplog.text
    with pytest.raises(SelfieError, match=r"10 \+ \[50, 40, 5\] = 105 prompts, but the pool has only 100"):
        split_prompts(pool(100), 10, [50, 40, 5])
    with pytest.raises(SelfieError, match=r"= 120 prompts, but the pool has only 100"):
        split_prompts(pool(100), 10, [110, 0])
    with pytest.raises(SelfieError, match=r"data.seed_size"):
        split_prompts(pool(100), 200, [])


@pytest.mark.parametrize(
    "seed_size, sizes, key",
    [(-1, [1], "data.seed_size"), (1, [2.5], r"data.iteration_sizes\[0\]"), (1, [1, "3"], r"data.iteration_sizes\[1\]")],
)
def test_bad_sizes(seed_size, sizes, key):
    with pytest.raises(SelfieError, match=key):
        split_prompts(pool(10), seed_size, sizes)


# ------------------------------------------------------------------ built-in demo data


def test_demo_sets():
    prompts = load_prompts("demo")
    pairs = load_preferences("demo-seed")
    assert len(prompts) == 300 and len(pairs) == 40
    assert ids(prompts)[:2] == ["demo-0001", "demo-0002"] and ids(pairs)[-1] == "seed-0040"
    texts = [r["prompt"][0]["content"] for r in prompts]
    assert len(set(texts)) == 300 and max(len(t) for t in texts) < 300
    seed_texts = {r["prompt"][0]["content"] for r in pairs}
    assert len(seed_texts) == 40 and not seed_texts & set(texts)
    assert all(p["chosen"] != p["rejected"] for p in pairs)
