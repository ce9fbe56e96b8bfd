from dataclasses import asdict
from pathlib import Path

import pytest

from selfie.cli.main import build_parser
from selfie.config.compat import changed_values, config_hash
from selfie.config.loader import dump_recipe, load_recipe, parse_overrides
from selfie.config.schema import (
    AlignEZConfig,
    EvalOptions,
    GenerateConfig,
    JudgeConfig,
    ModelConfig,
    RAHFConfig,
    RecipeConfig,
    TrainConfig,
)
from selfie.errors import SelfieError

RECIPES = sorted(Path(__file__).parent.parent.glob("recipes/*/*/*.yaml"))


def test_overrides_are_typed_and_nested():
    tree = parse_overrides(["--train.learning_rate", "1e-5", "--num_iterations=2", "--report_to", "[]"])
    assert tree == {"train": {"learning_rate": "1e-5"}, "num_iterations": 2, "report_to": []}
    config = load_recipe(None, ["--train.learning_rate", "1e-5", "--generate.temperature", "0.5"])
    assert config.train.learning_rate == 1e-5 and config.generate.temperature == 0.5


def test_unknown_key_is_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  learning_rat: 0.1\n")
    with pytest.raises(SelfieError, match=r"r.yaml: unknown recipe key 'train.learning_rat'"):
        load_recipe(recipe)
    with pytest.raises(SelfieError, match="unknown recipe key 'bogus'"):
        load_recipe(None, ["--bogus", "1"])


def test_wrong_type_and_missing_file(tmp_path):
    with pytest.raises(SelfieError, match="'num_iterations': expected int"):
        load_recipe(None, ["--num_iterations", "two"])
    with pytest.raises(SelfieError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(SelfieError, match="override --train has no value"):
        load_recipe(None, ["--train"])


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(p.parents[2])) for p in RECIPES])
def test_shipped_recipes_build_full_configs(path):
    config = load_recipe(path)
    assert isinstance(config, RecipeConfig)
    # the resolved config round-trips through config.yaml unchanged
    roundtrip = path.parent / "_roundtrip.yaml"
    try:
        roundtrip.write_text(dump_recipe(config))
        assert load_recipe(roundtrip) == config
    finally:
        roundtrip.unlink()


def test_paper_recipes_carry_the_paper_settings():
    for name in ("zephyr-7b", "llama-3-8b"):
        c = load_recipe(Path(__file__).parent.parent / f"recipes/{name}/spa/lora.yaml")
        assert (c.data.seed_size, c.data.iteration_sizes) == (2000, [8000, 20000, 30000])
        assert (c.train.beta, c.generate.temperature, c.generate.max_new_tokens, c.generate.num_responses) == (0.1, 0.7, 300, 2)
        assert c.refine.lambdas == [0.5, 0.25, 0.125] and c.refine.quantile == 0.1 and c.refine.alpha == 0.1


def test_hash_ignores_harmless_keys():
    base = load_recipe(None)
    assert config_hash(base) == config_hash(load_recipe(None, ["--report_to", "[]", "--train.logging_steps", "5"]))
    changed = load_recipe(None, ["--train.beta", "0.2"])
    assert config_hash(base) != config_hash(changed)
    assert list(changed_values(base, changed)) == ["train.beta"]


@pytest.mark.parametrize(
    "override, message",
    [
        (["--lora.r", "0"], "'lora.r': expected >= 1, got 0"),
        (["--train.per_device_train_batch_size", "0"], "'train.per_device_train_batch_size': expected >= 1"),
        (["--train.learning_rate", "-1"], "'train.learning_rate': expected > 0, got -1.0"),
        (["--generate.temperature", "-1"], "'generate.temperature': expected >= 0"),
        (["--generate.top_p", "0"], "'generate.top_p': expected a value in \\(0, 1\\]"),
        (["--generate.max_new_tokens", "0"], "'generate.max_new_tokens': expected >= 1"),
        (["--generate.num_responses", "1"], "'generate.num_responses': expected >= 2"),
        (["--generate.backend", "sglang"], "'generate.backend': expected 'auto', 'static', 'continuous' or 'vllm', got 'sglang'"),
        (["--data.iteration_sizes", "[10, -5]"], "'data.iteration_sizes': expected each > 0"),
        (["--num_iterations", "4"], "'num_iterations': expected 0..3"),
        (["--refine.alpha", "0.9"], "'refine.alpha': expected a value in \\[0, 0.5\\]"),
        (["--judge.truncated", "sometimes"], "'judge.truncated': expected one of drop, penalize, keep"),
        (["--judge.allow_truncated_chosen", "true"], "'judge.allow_truncated_chosen' was replaced by judge.truncated"),
        (["--judge.beta", "0.2"], "'judge.beta' was replaced by train.beta"),
        (["--init", "{method: alignez, n_layer: 3}"], "unknown recipe key 'init.n_layer'"),
        (["--init.method", "steer"], "'init.method': expected one of alignez, rahf, got 'steer'"),
        (["--init", "{method: rahf, steps: many}"], "'init.steps': expected int, got 'many'"),
        (["--eval", "{num_prompts: 3}"], "'eval.judge': required when 'eval' is set"),
        (["--eval", "{judge: 'callable:m:f', baseline: best}"], "'eval.baseline': expected one of init, seed, previous, none"),
        (["--eval", "{judge: 'callable:m:f', num_prompt: 3}"], "unknown recipe key 'eval.num_prompt'"),
    ],
)
def test_out_of_range_values_are_refused_at_load_naming_the_key(override, message):
    with pytest.raises(SelfieError, match=message):
        load_recipe(None, override)


def test_init_and_eval_are_typed_sections_merged_key_by_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("init: {method: alignez, n_layers: 2}\neval: {judge: 'callable:m:f', num_prompts: 4}\n")
    config = load_recipe(recipe, ["--init.alpha", "2", "--eval.baseline", "seed"])
    assert isinstance(config.init, AlignEZConfig) and (config.init.n_layers, config.init.alpha, config.init.finder) == (
        2,
        2.0,
        "svd",
    )
    assert (config.eval.judge, config.eval.num_prompts, config.eval.baseline) == ("callable:m:f", 4, "seed")
    switched = load_recipe(recipe, ["--init", "{method: rahf}"])
    assert isinstance(switched.init, RAHFConfig)  # another method replaces the section: its keys are that method's
    changed = load_recipe(recipe, ["--init.alpha", "2", "--eval.baseline", "seed", "--init.n_layers", "3"])
    assert list(changed_values(config, changed)) == ["init.n_layers"]  # a typed section names the key that differs


def _defaults(*argv: str) -> dict:
    """The parsed defaults of a verb's flags (required arguments filled with placeholders)."""
    return vars(build_parser().parse_args(list(argv)))


def test_command_flags_take_their_defaults_from_the_config_dataclasses():
    generate = _defaults("generate", "--model", "m", "--prompts", "p", "--output", "o")
    assert {k: generate[k] for k in asdict(GenerateConfig())} == asdict(GenerateConfig())
    assert (generate["seed"], generate["dtype"]) == (RecipeConfig.seed, ModelConfig.dtype)
    judge = _defaults("judge", "--model", "m", "--adapter", "a", "--responses", "r", "--output", "o")
    # the verb labels by the implicit reward: the other labellers' keys and the seed stage's check are not its flags;
    # nor is `anchored` (the run's generate stage samples the anchor; rows that carry one are paired by it)
    not_flags = ("labeller", "bradley_terry_l2", "ensemble_size", "min_agreement", "signal_folds", "anchored")
    expected = {k: v for k, v in asdict(JudgeConfig()).items() if k not in not_flags}
    assert {k: judge[k] for k in expected} == expected and judge["beta"] == TrainConfig.beta
    for verb in (["winrate", "--model-a", "a", "--model-b", "b"], ["run", "RUN"]):
        options = _defaults("eval", *verb, "--judge", "j", "--output", "o")
        assert {k: options[k] for k in asdict(EvalOptions()) if k != "num_pairs"} == {
            k: v for k, v in asdict(EvalOptions()).items() if k != "num_pairs"
        }
    assert (
        _defaults("eval", "accuracy", "--judge", "j", "--output", "o", "--preferences", "p")["num_pairs"] == EvalOptions.num_pairs
    )
    assert _defaults("edit", "--model", "m", "--output", "o")["seed"] == RecipeConfig.seed
