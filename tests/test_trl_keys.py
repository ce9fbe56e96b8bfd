"""What a TRL / alignment-handbook user brings: any trainer argument under `train:`, and the model loading keys
(revision, remote code, attention, bitsandbytes 4-bit / 8-bit) under `model:`, on the tiny model."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file
from test_preflight import make_inputs, run
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig

import selfie.run.preflight
from selfie.config.compat import config_hash
from selfie.config.loader import dump_recipe, load_recipe
from selfie.config.schema import ModelConfig, TrainConfig, section_fields
from selfie.config.trainer_fields import SELFIE_SETS, trainer_fields
from selfie.errors import SelfieError
from selfie.export.policy import write_merged
from selfie.models import load_policy, quantization_config
from selfie.training.arguments import NoiseAwareDPOConfig
from selfie.training.stage import TrainOutputs, train_iteration, train_seed

from tiny import toy_pairs

# a handbook DPO recipe's trainer keys that selfie's own train: keys do not cover
HANDBOOK_TRAIN = {
    "optim": "adamw_torch",
    "weight_decay": 0.01,
    "max_grad_norm": 0.5,
    "adam_beta2": 0.98,
    "adam_epsilon": 1e-6,
    "gradient_checkpointing": True,
    "gradient_checkpointing_kwargs": {"use_reentrant": False},
}
TINY_TRAIN = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "max_length": 128}


def recipe(**sections):
    base = {"report_to": [], "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "train": TINY_TRAIN}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return load_recipe(None, base)


def outputs(directory: Path) -> TrainOutputs:
    return TrainOutputs(directory / "adapter", directory / "checkpoints")


class Seen(TrainerCallback):
    """The arguments, model and optimizer the trainer runs with, as of its first optimizer step."""

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == 1:
            self.args, self.model, self.optimizer = args, model, optimizer


# ---- train: -------------------------------------------------------------------------------------


def test_trainer_fields_a_recipe_sets_reach_the_arguments_and_optimizer_the_trainer_runs_with(tiny_model, tmp_path):
    seen = Seen()
    train_seed(
        tiny_model, toy_pairs(4), outputs(tmp_path / "iter_000"), recipe(train=HANDBOOK_TRAIN), callbacks=[seen], max_steps=1
    )
    assert {key: getattr(seen.args, key) for key in HANDBOOK_TRAIN} == HANDBOOK_TRAIN
    optimizer = seen.optimizer.optimizer  # accelerate's wrapper around the torch optimizer
    assert type(optimizer) is torch.optim.AdamW and not optimizer.defaults.get("fused")  # adamw_torch, not TRL's fused default
    assert {(g["betas"], g["eps"]) for g in optimizer.param_groups} == {((0.9, 0.98), 1e-6)}
    assert 0.01 in {g["weight_decay"] for g in optimizer.param_groups}
    assert seen.model.is_gradient_checkpointing


def test_every_trainer_field_is_a_recipe_key_at_its_own_default():
    """Derived from NoiseAwareDPOConfig: each field (selfie's own keys and those it sets left out) loads with TRL's default."""
    taken = set(section_fields(TrainConfig)) | set(SELFIE_SETS)
    fields = [f for f in dataclasses.fields(NoiseAwareDPOConfig) if f.init and f.name not in taken]
    assert len(fields) > 50 and {"optim", "weight_decay", "adam_beta2", "use_liger_kernel"} <= {f.name for f in fields}
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert load_recipe(None, {"train": {f.name: default}}).train.trainer_args == {f.name: default}, f.name


@pytest.mark.parametrize("name", ["output_dir", "seed", "max_steps", "save_strategy", "loss_type", "refine_alpha", "bf16"])
def test_a_trainer_field_selfie_sets_is_refused_with_the_reason(name):
    with pytest.raises(SelfieError) as refused:
        load_recipe(None, [f"--train.{name}", "1"])
    assert (
        str(refused.value) == f"override --train.{name}: recipe key 'train.{name}': selfie sets it itself ({SELFIE_SETS[name]})"
    )


def test_the_fields_selfie_sets_are_fields_of_the_trainer_arguments():
    assert set(SELFIE_SETS) <= set(trainer_fields())  # a TRL upgrade renaming one shows here
    own = {f.name for f in dataclasses.fields(NoiseAwareDPOConfig)} - {f.name for f in dataclasses.fields(DPOConfig)}
    assert own == {name for name in SELFIE_SETS if name.startswith(("refine_", "dnd_"))}  # the noise-aware loss's own


@pytest.mark.parametrize(
    "override, message",
    [
        (["--train.no_such_field", "1"], r"unknown recipe key 'train.no_such_field' \(known: adapter_mode, beta, .* DPOConfig"),
        (["--train.weight_decay", "heavy"], r"recipe key 'train.weight_decay': expected float, got 'heavy'"),
        (["--train.optim", "adamw_bogus"], r"recipe key 'train.optim': expected one of adamw_torch, adamw_torch_fused, "),
        (["--train.gradient_checkpointing_kwargs", "[1]"], r"recipe key 'train.gradient_checkpointing_kwargs': expected"),
        (["--train.trainer_args", "{optim: sgd}"], r"unknown recipe key 'train.trainer_args'"),
    ],
)
def test_a_bad_trainer_field_is_one_line_naming_it(override, message):
    with pytest.raises(SelfieError, match=message):
        load_recipe(None, override)


# ---- the recipe hash ----------------------------------------------------------------------------

# config_hash of the shipped recipes before train: took the trainer's fields and model: its loading keys (the paper-scale
# recipes have since set train.global_batch_size and generate.backend: their runs never got past ZeRO-3's first reload)
HASHES = {None: "80f89a966768d64e", "recipes/smollm2-135m/spa/demo.yaml": "2186eaf395a70668"}
ROOT = Path(__file__).parent.parent


def test_a_recipe_not_using_the_new_keys_keeps_its_hash():
    for path, digest in HASHES.items():
        assert config_hash(load_recipe(path and ROOT / path)) == digest, path
    at_defaults = ["--model.revision", "null", "--model.load_in_4bit", "false", "--model.bnb_4bit_quant_type", "nf4"]
    assert config_hash(load_recipe(None, at_defaults)) == HASHES[None]


def test_the_new_keys_enter_the_hash_and_round_trip_through_config_yaml(tmp_path):
    config = load_recipe(None, {"train": HANDBOOK_TRAIN, "model": {"load_in_4bit": True, "revision": "v1"}})
    others = [load_recipe(None, {"train": {"optim": "sgd"}}), load_recipe(None, {"model": {"load_in_4bit": True}})]
    assert len({config_hash(c) for c in [config, *others]} | {HASHES[None]}) == 4
    written = tmp_path / "config.yaml"
    written.write_text(dump_recipe(config))
    assert load_recipe(written) == config and config_hash(load_recipe(written)) == config_hash(config)


# ---- model: -------------------------------------------------------------------------------------


@pytest.fixture
def from_pretrained_calls(monkeypatch) -> dict[str, list[dict]]:
    """The keyword arguments of every model and tokenizer from_pretrained call (the real ones still run)."""
    calls = {"model": [], "tokenizer": []}
    for kind, cls in (("model", AutoModelForCausalLM), ("tokenizer", AutoTokenizer)):
        real = cls.from_pretrained

        def record(*args, _real=real, _calls=calls[kind], **kwargs):
            _calls.append(kwargs)
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", record)
    return calls


def test_each_model_key_reaches_from_pretrained(tiny_model, from_pretrained_calls):
    settings = ModelConfig(dtype="float32", revision="main", trust_remote_code=True, attn_implementation="eager")
    model, _ = load_policy(tiny_model, None, settings, device="cpu")
    (call,) = from_pretrained_calls["model"]
    assert (call["revision"], call["trust_remote_code"], call["attn_implementation"]) == ("main", True, "eager")
    assert model.config._attn_implementation == "eager" and "quantization_config" not in call
    assert [(c["revision"], c["trust_remote_code"]) for c in from_pretrained_calls["tokenizer"]] == [("main", True)]


def test_the_quantisation_keys_load_bitsandbytes_weights(tiny_model):
    settings = ModelConfig(
        load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype="bfloat16", use_bnb_nested_quant=True
    )
    model, _ = load_policy(tiny_model, None, settings, device="cpu")
    quantization = model.hf_quantizer.quantization_config
    assert (quantization.bnb_4bit_quant_type, quantization.bnb_4bit_compute_dtype, quantization.bnb_4bit_use_double_quant) == (
        "fp4",
        torch.bfloat16,
        True,
    )
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    model, _ = load_policy(tiny_model, None, ModelConfig(load_in_8bit=True), device="cpu")
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)


def test_under_zero3_the_4bit_weights_are_stored_in_the_model_dtype_for_deepspeed_to_shard(monkeypatch):
    settings = ModelConfig(load_in_4bit=True, dtype="float32")
    assert quantization_config(settings).bnb_4bit_quant_storage == torch.uint8  # bitsandbytes' own packing
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")  # what `accelerate launch` sets from the config
    assert quantization_config(settings).bnb_4bit_quant_storage == torch.float32


def test_load_in_4bit_and_8bit_exclude_each_other():
    with pytest.raises(SelfieError, match="keys 'model.load_in_4bit' and 'model.load_in_8bit': both set"):
        load_recipe(None, ["--model.load_in_4bit", "true", "--model.load_in_8bit", "true"])
    with pytest.raises(SelfieError, match="'model.bnb_4bit_quant_type': expected 'nf4' or 'fp4', got 'int4'"):
        load_recipe(None, ["--model.bnb_4bit_quant_type", "int4"])


def test_qlora_trains_the_seed_and_an_iteration_on_a_4bit_base_and_exports_into_the_unquantised_one(tiny_model, tmp_path, caplog):
    config = recipe(model={"load_in_4bit": True}, train={"gradient_checkpointing": True})
    seen = Seen()
    metrics = train_seed(tiny_model, toy_pairs(4), outputs(tmp_path / "iter_000"), config, callbacks=[seen], max_steps=3)
    assert metrics["steps"] == 3 and isinstance(
        seen.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit
    )
    seed = load_file(tmp_path / "iter_000" / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in seed.items())  # lora_B starts at zero
    train_iteration(
        tiny_model, tmp_path / "iter_000" / "adapter", toy_pairs(4), outputs(tmp_path / "iter_001"), config, 1, max_steps=2
    )
    trained = load_file(tmp_path / "iter_001" / "adapter" / "adapter_model.safetensors")
    assert trained.keys() == seed.keys() and any(not torch.equal(trained[k], seed[k]) for k in seed)
    merge = dataclasses.replace(config, train=dataclasses.replace(config.train, adapter_mode="merge"))
    train_iteration(
        tiny_model, tmp_path / "iter_000" / "adapter", toy_pairs(4), outputs(tmp_path / "merge"), merge, 1, max_steps=1
    )
    assert json.loads((tmp_path / "merge" / "adapter" / "adapter_config.json").read_text())["r"] == 8  # stacked on the 4-bit base

    with caplog.at_level(logging.WARNING, logger="selfie.export.policy"):
        write_merged(tiny_model, tmp_path / "iter_001" / "adapter", tmp_path / "merged", None, config.model)
    assert "unquantised" in caplog.text
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear


# ---- preflight ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    return make_inputs(tmp_path_factory.mktemp("trl-keys"), tiny_model)


def test_a_dry_run_takes_the_handbook_keys(inputs, tmp_path, capsys):
    train = [f"--train.{key}={json.dumps(value)}" for key, value in HANDBOOK_TRAIN.items()]
    model = ["--model.revision", "main", "--model.attn_implementation", "sdpa", "--model.load_in_4bit", "true"]
    model += ["--model.bnb_4bit_compute_dtype", "float32", "--model.use_bnb_nested_quant", "true"]
    code, out, err = run(inputs, tmp_path / "run", train + model, capsys, dry_run=True)
    assert code == 0, err
    assert "(4-bit base: QLoRA)" in out and not (tmp_path / "run").exists()


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_without_flash_attn_is_one_line(inputs, tmp_path, capsys):
    code, _, err = run(inputs, tmp_path / "run", ["--model.attn_implementation", "flash_attention_2"], capsys, dry_run=True)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("selfie: error: recipe key 'model.attn_implementation': FlashAttention2 ")


def test_quantised_loading_without_bitsandbytes_is_one_line(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(selfie.run.preflight, "installed", lambda package: package != "bitsandbytes")  # as if not installed
    code, _, err = run(inputs, tmp_path / "run", ["--model.load_in_8bit", "true"], capsys, dry_run=False)
    assert code == 2 and not (tmp_path / "run").exists()
    assert (
        err == "selfie: error: recipe key 'model.load_in_8bit': quantised loading needs bitsandbytes (pip install bitsandbytes)\n"
    )
