"""Data sources a recipe can name (issue 22, data): hub-style load options, column mappings, implicit-prompt
(hh-rlhf) preference rows, mixtures drawn with data.shuffle_seed, model.chat_template and data.system_prompt; each
bad input one line naming its file, row or key, before any compute."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import yaml

from selfie.config.compat import config_hash
from selfie.config.loader import dump_recipe, load_recipe
from selfie.config.schema import ModelConfig, SourceConfig
from selfie.data import load_options, load_preferences, load_prompts, seed_preferences
from selfie.errors import SelfieError
from selfie.models import load_tokenizer
from selfie.tokens import chat_ids

ROOT = Path(__file__).parent.parent
USER = lambda text: {"role": "user", "content": text}  # noqa: E731
ASSISTANT = lambda text: {"role": "assistant", "content": text}  # noqa: E731
HH_ROW = {
    "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4, of course.",
    "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: Five.",
}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def prompts_of(n: int, stem: str) -> list[dict]:
    return [{"prompt_id": f"{stem}{i}", "prompt": f"{stem} question {i}"} for i in range(n)]


def ids(rows: list[dict]) -> list[str]:
    return [row["prompt_id"] for row in rows]


def selfie(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "selfie.cli.main", *args], cwd=cwd, env=env, capture_output=True, text=True)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single `selfie: error:` line of a refused command (no traceback)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("selfie: error:")]
    return line


# ------------------------------------------------------------------ implicit prompts (hh-rlhf)


# a multi-turn row in the dataset's own form (Anthropic/hh-rlhf, helpful-base): the answers part in the last turn
HH_DIALOGUE = {
    "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: How do I bake bread?\n\nAssistant: Mix "
    "flour, water, salt and yeast, let it rise, then bake it at 230 C.",
    "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: How do I bake bread?\n\nAssistant: Buy it.",
}


def test_hh_rlhf_rows_become_user_messages_without_the_markers(tmp_path):
    (row,) = load_preferences(write_jsonl(tmp_path / "hh.jsonl", [HH_ROW]))
    assert row["prompt"] == [USER("What is 2+2?")]
    assert row["chosen"] == [ASSISTANT("4, of course.")] and row["rejected"] == [ASSISTANT("Five.")]
    assert load_prompts(str(tmp_path / "hh.jsonl")) == [{"prompt_id": row["prompt_id"], "prompt": row["prompt"]}]


def test_a_multi_turn_hh_rlhf_transcript_is_split_into_turns_as_trls_hh_script_does(tmp_path):
    (row,) = load_preferences(write_jsonl(tmp_path / "hh.jsonl", [HH_DIALOGUE]))
    assert row["prompt"] == [USER("Hi there"), ASSISTANT("Hello! How can I help?"), USER("How do I bake bread?")]
    assert row["chosen"] == [ASSISTANT("Mix flour, water, salt and yeast, let it rise, then bake it at 230 C.")]
    assert row["rejected"] == [ASSISTANT("Buy it.")]


def test_a_text_pair_is_never_cut_inside_a_word(tmp_path):
    """TRL's common prefix of "... Sure thing" and "... Sorry" ends in "S": the cut moves to the word's start."""
    rows = [{"chosen": "Q: Help?\nA: Sure thing.", "rejected": "Q: Help?\nA: Sorry."}]
    (row,) = load_preferences(write_jsonl(tmp_path / "hh.jsonl", rows))
    assert row["prompt"] == [USER("Q: Help?\nA:")]
    assert (row["chosen"], row["rejected"]) == ([ASSISTANT("Sure thing.")], [ASSISTANT("Sorry.")])


def test_conversations_sharing_their_first_turns_give_those_turns_as_the_prompt(tmp_path):
    talk = [USER("Hi"), ASSISTANT("Hello!"), USER("Name a colour.")]
    rows = [{"chosen": [*talk, ASSISTANT("Blue.")], "rejected": [*talk, ASSISTANT("Seven.")]}]
    (row,) = load_preferences(write_jsonl(tmp_path / "conv.jsonl", rows))
    assert row["prompt"] == talk and row["chosen"] == [ASSISTANT("Blue.")] and row["rejected"] == [ASSISTANT("Seven.")]


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"chosen": "Human: Q\n\nAssistant: A", "rejected": [USER("Q"), ASSISTANT("B")]},
            "must both be strings or both lists of messages",
        ),
        ({"chosen": "Yes.", "rejected": "No."}, "do not start alike"),
        ({"chosen": "Human: Q\n\nAssistant: A", "rejected": 3}, "'rejected' must be a string, got int"),
    ],
)
def test_a_bad_implicit_prompt_row_is_one_line_naming_file_and_row(tmp_path, row, message):
    src = write_jsonl(tmp_path / "hh.jsonl", [HH_ROW, row])
    with pytest.raises(SelfieError) as e:
        load_preferences(src)
    assert str(e.value).startswith(f"{src}: row 2: ") and message in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------ column mappings


def test_a_column_mapping_reads_other_column_names(tmp_path):
    rows = [{"question": "Name a colour.", "good": "Blue.", "bad": "Seven.", "prompt": "ignored"}]
    src = write_jsonl(tmp_path / "qa.jsonl", rows)
    mapping = {"question": "prompt", "good": "chosen", "bad": "rejected"}
    expected = [{"prompt": [USER("Name a colour.")], "chosen": [ASSISTANT("Blue.")], "rejected": [ASSISTANT("Seven.")]}]
    pairs = load_preferences([SourceConfig(path=src, columns=mapping)])
    assert [{k: v for k, v in p.items() if k != "prompt_id"} for p in pairs] == expected
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "qa.parquet"))  # columns selfie would not read otherwise
    assert load_preferences([SourceConfig(path=str(tmp_path / "qa.parquet"), columns=mapping)]) == pairs


def test_a_mapped_column_the_source_lacks_is_named(tmp_path):
    src = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q"}])
    with pytest.raises(SelfieError, match=r"qa.jsonl: no column 'query' to use as 'prompt'"):
        load_prompts([SourceConfig(path=src, columns={"query": "prompt"})])


def test_a_mapping_to_a_column_selfie_does_not_read_is_refused_at_load():
    with pytest.raises(SelfieError, match=r"'data.prompts\[0\].columns': expected a mapping of source columns to .*'text'"):
        load_recipe(None, ["--data.prompts", "[{path: x.jsonl, columns: {q: text}}]"])


# ------------------------------------------------------------------ mixtures


@pytest.fixture
def two_sources(tmp_path) -> tuple[str, str]:
    return write_jsonl(tmp_path / "a.jsonl", prompts_of(10, "a")), write_jsonl(tmp_path / "b.jsonl", prompts_of(20, "b"))


def test_a_mixture_takes_each_sources_share_exactly(two_sources):
    a, b = two_sources
    rows = load_prompts([SourceConfig(path=a, weight=0.5), SourceConfig(path=b, count=3)])
    assert sum(i.startswith("a") for i in ids(rows)) == 5 and sum(i.startswith("b") for i in ids(rows)) == 3
    assert len(load_prompts([SourceConfig(path=a), SourceConfig(path=b, weight=0.25)])) == 10 + 5


def test_a_mixture_is_drawn_with_the_shuffle_seed(two_sources):
    a, b = two_sources
    mixture = [SourceConfig(path=a, weight=0.5), SourceConfig(path=b, count=3)]
    first = ids(load_prompts(mixture, shuffle_seed=42))
    assert ids(load_prompts(mixture, shuffle_seed=42)) == first
    assert ids(load_prompts(mixture, shuffle_seed=7)) != first


def test_a_recipes_mixture_is_drawn_with_data_shuffle_seed_and_round_trips(two_sources, tmp_path):
    from selfie.data import pool_prompts

    a, b = two_sources
    sources = f"[{{path: {a}, weight: 0.5}}, {{path: {b}, count: 3}}]"
    config = load_recipe(None, ["--data.prompts", sources, "--data.shuffle_seed", "3"])
    assert ids(pool_prompts(config.data)) == ids(load_prompts(config.data.prompts, shuffle_seed=3))
    (tmp_path / "recipe.yaml").write_text(dump_recipe(config))
    again = load_recipe(tmp_path / "recipe.yaml")
    assert again.data.prompts == config.data.prompts and config_hash(again) == config_hash(config)


def test_evaluating_a_run_on_its_mixed_pool_uses_the_held_out_slice_of_the_pool_as_the_run_drew_it(two_sources):
    from selfie.data import pool_prompts, split_prompts
    from selfie.evaluation.compare import eval_prompts

    a, b = two_sources
    sources = f"[{{path: {a}, weight: 0.5}}, {{path: {b}, count: 12}}]"
    overrides = ["--data.prompts", sources, "--data.shuffle_seed", "3", "--data.seed_size", "2"]
    config = load_recipe(None, [*overrides, "--data.iteration_sizes", "[4]", "--num_iterations", "1"])
    held_out = split_prompts(pool_prompts(config.data), 2, [4], 3).held_out
    assert len(held_out) == 17 - 6
    assert ids(eval_prompts(config.data.prompts, config.data.split, 0, config)) == ids(held_out)


@pytest.mark.parametrize(
    "source, message",
    [
        ("{path: a.jsonl, weight: 0.5, count: 2}", "'data.prompts[0].weight' and 'data.prompts[0].count': both set"),
        ("{path: a.jsonl, weight: 1.5}", "'data.prompts[0].weight': expected the fraction of its rows taken, in (0, 1], got 1.5"),
        ("{weight: 0.5}", "'data.prompts[0].path': expected a hub id, file or directory"),
        ("{path: a.jsonl, splt: test}", "unknown recipe key 'data.prompts[0].splt'"),
    ],
)
def test_a_bad_source_is_one_line_naming_the_key(source, message):
    with pytest.raises(SelfieError) as e:
        load_recipe(None, ["--data.prompts", f"[{source}]"])
    assert message in str(e.value)


def test_a_count_beyond_the_source_is_refused(two_sources):
    with pytest.raises(SelfieError, match=r"a.jsonl: count 11 asks for 11 of its 10 rows"):
        load_prompts([SourceConfig(path=two_sources[0], count=11)])


def test_a_bad_row_of_a_mixtures_second_source_names_that_file_and_row(two_sources, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"prompt": 5}])
    with pytest.raises(SelfieError) as e:
        load_prompts([SourceConfig(path=two_sources[0]), SourceConfig(path=bad)])
    assert str(e.value) == f"{bad}: row 2: 'prompt' must be a string or a list of messages, got int"


def test_one_prompt_id_for_two_prompts_across_sources_names_both(two_sources, tmp_path):
    other = write_jsonl(tmp_path / "c.jsonl", [{"prompt_id": "a1", "prompt": "something else"}])
    with pytest.raises(SelfieError, match=r"c.jsonl: row 1: 'prompt_id' 'a1' repeats .*a.jsonl: row 2 with a different"):
        load_prompts([SourceConfig(path=two_sources[0]), SourceConfig(path=other)])


# ------------------------------------------------------------------ hub-style load options


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    """A directory laid out as a hub dataset repository: data files and a README naming two configurations."""
    root = tmp_path / "hub-style"
    (root / "data").mkdir(parents=True)
    write_jsonl(root / "data" / "small.jsonl", prompts_of(2, "s"))
    write_jsonl(root / "data" / "large.jsonl", prompts_of(5, "l"))
    card = {
        "configs": [
            {"config_name": "small", "data_files": "data/small.jsonl"},
            {"config_name": "large", "data_files": "data/large.jsonl"},
        ]
    }
    (root / "README.md").write_text(f"---\n{yaml.safe_dump(card)}---\n")
    return root


def test_name_data_files_and_data_dir_reach_load_dataset(dataset_dir):
    path = str(dataset_dir)
    assert ids(load_prompts([SourceConfig(path=path, name="small")])) == ["s0", "s1"]
    assert len(load_prompts([SourceConfig(path=path, name="large")])) == 5
    assert ids(load_prompts([SourceConfig(path=path, data_files="data/small.jsonl")])) == ["s0", "s1"]
    assert len(load_prompts([SourceConfig(path=path, data_dir="data", data_files="large.jsonl")])) == 5
    with pytest.raises(SelfieError, match=r"hub-style: datasets.load_dataset refuses it \(.*'medium' not found"):
        load_prompts([SourceConfig(path=path, name="medium")])


def test_every_load_option_set_is_handed_to_load_dataset():
    source = SourceConfig(path="org/set", name="en", revision="v1.0", data_files={"train": ["a.jsonl"]}, data_dir="d")
    assert load_options(source) == {"name": "en", "revision": "v1.0", "data_files": {"train": ["a.jsonl"]}, "data_dir": "d"}
    assert load_options(SourceConfig(path="org/set")) == {}


def test_a_directory_of_data_files_reads_without_options(tmp_path):
    (tmp_path / "files").mkdir()
    write_jsonl(tmp_path / "files" / "train.jsonl", prompts_of(3, "f"))
    assert ids(load_prompts(str(tmp_path / "files"))) == ["f0", "f1", "f2"]


def test_load_options_on_a_file_are_refused(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", prompts_of(2, "a"))
    with pytest.raises(SelfieError, match=r"a.jsonl: revision apply to hub datasets and dataset directories, not to a file"):
        load_prompts([SourceConfig(path=src, revision="main")])


# ------------------------------------------------------------------ files that are not UTF-8


@pytest.fixture
def latin1(tmp_path) -> Path:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    return path


def test_a_file_that_is_not_utf8_is_one_line_naming_it(latin1):
    for load in (load_prompts, load_preferences):  # the prompt pool's loader and the seed loader
        with pytest.raises(SelfieError) as e:
            load(str(latin1))
        assert str(e.value) == f"{latin1}: not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"


def tiny_recipe(tmp_path: Path, model: str, **data) -> Path:
    recipe = {
        "output_dir": str(tmp_path / "run"),
        "num_iterations": 1,
        "model": {"name": model},
        "data": {"prompts": "demo", "seed_pairs": "demo-seed", "seed_size": 0, "iteration_sizes": [4], **data},
        "generate": {"max_new_tokens": 8},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_selfie_run_dry_run_and_generate_name_a_file_that_is_not_utf8(tmp_path, latin1, tiny_model):
    recipe = tiny_recipe(tmp_path, tiny_model, seed_pairs=str(latin1))
    expected = f"selfie: error: {latin1}: not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"
    assert one_line_error(selfie("run", str(recipe), "--dry-run", cwd=tmp_path)) == expected
    out = tmp_path / "responses.jsonl"
    generate = selfie("generate", "--model", tiny_model, "--prompts", str(latin1), "--output", str(out), cwd=tmp_path)
    assert one_line_error(generate) == expected and not out.exists()
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ chat template and system prompt


def test_a_chat_template_from_a_string_or_a_file_replaces_the_tokenizers(tiny_model, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    (tmp_path / "t.jinja").write_text(template)
    for value in (template, str(tmp_path / "t.jinja")):
        tokenizer = load_tokenizer(tiny_model, ModelConfig(name=tiny_model, chat_template=value))
        text = tokenizer.decode(chat_ids(tokenizer, [USER("hello world")], add_generation_prompt=True))
        assert text == "[user] hello world\n[assistant] "
    with pytest.raises(SelfieError, match=r"'model.chat_template': nowhere.jinja: no such file, and not a Jinja template"):
        load_tokenizer(tiny_model, ModelConfig(name=tiny_model, chat_template="nowhere.jinja"))


def test_the_system_prompt_opens_every_encoded_prompt_without_one(tiny_model, tmp_path):
    src = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "hello world"}, {"prompt": [{"role": "system", "content": "Own."}, USER("why")]}]
    )
    plain, opened = load_prompts(src), load_prompts(src, system_prompt="You are a helpful assistant.")
    assert ids(plain) == ids(opened)  # a prompt keeps its source's id
    tokenizer = load_tokenizer(tiny_model)
    texts = [tokenizer.decode(chat_ids(tokenizer, row["prompt"], add_generation_prompt=True)) for row in opened]
    assert texts[0].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhello world")
    assert texts[1].startswith("<|im_start|>system\nOwn.<|im_end|>")


def test_new_keys_enter_the_hash_only_when_set():
    base = config_hash(load_recipe(None))
    assert config_hash(load_recipe(None, ["--data.system_prompt", "null", "--model.chat_template", "null"])) == base
    assert config_hash(load_recipe(None, ["--data.system_prompt", "Be brief."])) != base


@pytest.fixture
def templateless_model(tiny_model, tmp_path) -> str:
    """The tiny model with its tokenizer's chat template removed."""
    path = tmp_path / "no-template"
    shutil.copytree(tiny_model, path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(path)


def test_a_tokenizer_without_a_chat_template_is_one_line_before_the_run(templateless_model, tmp_path):
    recipe = tiny_recipe(tmp_path, templateless_model)
    line = one_line_error(selfie("run", str(recipe), "--dry-run", cwd=tmp_path))
    assert line.endswith(
        f"model '{templateless_model}': its tokenizer has no chat template; set model.chat_template (a Jinja template or a file holding one)"
    )
    (tmp_path / "chat.jinja").write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    result = selfie("run", str(recipe), "--dry-run", "--model.chat_template", str(tmp_path / "chat.jinja"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "template   model.chat_template" in result.stdout and not (tmp_path / "run").exists()


def test_an_init_edit_loads_pi_init_with_the_recipes_chat_template(templateless_model, tmp_path):
    from selfie.config.schema import RAHFConfig
    from selfie.edit import build_edited_model

    init = RAHFConfig(num_prompts=4, max_new_tokens_resp=4, batch_size=4, dtype="float32", steps=1)
    with pytest.raises(SelfieError, match="has no chat template; set model.chat_template"):
        build_edited_model(init, templateless_model, tmp_path / "bare", seed=0)
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    settings = ModelConfig(name=templateless_model, chat_template=template)
    out = build_edited_model(init, templateless_model, tmp_path / "edited", seed=0, model_settings=settings)
    assert load_tokenizer(str(out)).chat_template == template  # the edited pi_init keeps the template it was built with
    other = ModelConfig(name=templateless_model, chat_template=template.replace(": ", " -> "))
    with pytest.raises(SelfieError, match=r"was built with other settings \(model.chat_template: "):
        build_edited_model(init, templateless_model, out, seed=0, model_settings=other)


def test_a_max_length_no_prompt_fits_is_refused_by_the_dry_run(tiny_model, tmp_path):
    recipe = tiny_recipe(tmp_path, tiny_model)
    line = one_line_error(selfie("run", str(recipe), "--dry-run", "--train.max_length", "2", cwd=tmp_path))
    assert "recipe key 'train.max_length': 2 tokens leave no room for a response after any prompt of the seed pairs" in line
    assert line.endswith("so TRL would drop every pair")
    assert not (tmp_path / "run").exists()


def test_a_max_length_no_prompt_of_an_iteration_slice_fits_is_refused(tiny_model, tmp_path):
    """The seed pairs' prompts fit in 40 tokens; none of the 4 prompts of iteration 1's slice does."""
    from selfie.run.preflight import preflight

    config = load_recipe(tiny_recipe(tmp_path, tiny_model), ["--train.max_length", "40"])
    with pytest.raises(
        SelfieError, match=r"^4 of 4 prompts of iteration 1's slice left out: train.max_length 40 leaves no room .*; none is left"
    ):
        preflight(config)
    preflight(load_recipe(tiny_recipe(tmp_path, tiny_model), ["--train.max_length", "1024"]))


def test_a_utf8_file_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps({"prompt": "Name a colour."}) + "\n").encode())
    assert [row["prompt"] for row in load_prompts(str(path))] == [[USER("Name a colour.")]]


def test_an_empty_recipe_is_one_line(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(SelfieError, match=r"empty.yaml: the recipe is empty; start from one in recipes/"):
        load_recipe(tmp_path / "empty.yaml")


def test_seed_pairs_whose_chosen_is_their_rejected_are_left_out_and_counted(tmp_path, caplog):
    rows = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "yes" if i == 1 else "no"} for i in range(3)]
    config = load_recipe(None, ["--data.seed_pairs", write_jsonl(tmp_path / "seed.jsonl", rows)])
    with caplog.at_level("WARNING", logger="selfie.data"):
        pairs = seed_preferences(config.data, [])
    assert [row["prompt"] for row in pairs] == [[USER("q0")], [USER("q2")]]
    assert "1 of 3 pairs have the same chosen and rejected response" in caplog.text
