"""Build a representation-edited pi_init (AlignEZ or RAHF) as a standalone model directory; AlignEZ's
self-generated pairs as seed-DPO data.

Resumable at the coarse level: a complete model already in `output_dir` is returned as is (if it
was built with the same settings), the model is written to a temporary directory and renamed into
place, and the self-generated data in `<output_dir>.work/` is reused when its settings match.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from selfie.config.schema import AlignEZConfig, EditConfig, ModelConfig, RAHFConfig, RecipeConfig
from selfie.data import load_prompts
from selfie.edit.alignez import alignez_edits
from selfie.edit.alignez_data import AlignEZData, generate_alignez_data
from selfie.edit.answers import model_answers
from selfie.edit.apply import EDIT_FILE, fold_edits, is_saved_model, save_standalone
from selfie.edit.rahf import rahf_model
from selfie.edit.workdir import cached_rows
from selfie.errors import SelfieError
from selfie.io import read_json
from selfie.models import load_model, load_tokenizer

logger = logging.getLogger(__name__)


def work_dir_for(model_dir: str | Path) -> Path:
    """Where the self-generated data of the edit built into `model_dir` is kept: `<model_dir>.work`."""
    model_dir = Path(model_dir)
    return model_dir.with_name(model_dir.name + ".work")


def _loading(model_name: str, dtype: str, settings: ModelConfig | None) -> ModelConfig:
    """How pi_init is loaded to be edited: as the recipe's model: section says (revision, remote code, chat template),
    in init.dtype and unquantised (the edit is folded into full-precision weights)."""
    return (settings or ModelConfig(name=model_name)).unquantised(dtype)


def _loading_record(settings: ModelConfig | None) -> dict:
    """The model: keys besides the name that change what an edit is built from, where set (old builds record none)."""
    keys = ("revision", "trust_remote_code", "chat_template")
    return {key: getattr(settings, key) for key in keys if settings is not None and getattr(settings, key)}


def _load(model_name: str, dtype: str, settings: ModelConfig | None):
    loading = _loading(model_name, dtype, settings)
    tokenizer = load_tokenizer(model_name, loading)
    return load_model(model_name, loading, "cuda" if torch.cuda.is_available() else None).eval(), tokenizer


def _prompts(config: EditConfig, seed: int) -> list[dict]:
    rows = load_prompts(config.prompts)
    if len(rows) < config.num_prompts:
        raise SelfieError(f"init.num_prompts: {config.num_prompts} requested, but '{config.prompts}' has {len(rows)} prompts")
    return random.Random(seed).sample(rows, config.num_prompts)


def _data_settings(
    model_name: str, model_settings: ModelConfig | None, config: EditConfig, seed: int, keys: tuple[str, ...]
) -> dict:
    """What the self-generated data depends on (so that changing e.g. alpha reuses it)."""
    settings = dataclasses.asdict(config)
    loading = _loading_record(model_settings)
    return {
        "model": model_name,
        **({"loading": loading} if loading else {}),
        "seed": seed,
        **{
            k: settings[k] for k in ("prompts", "num_prompts", "max_new_tokens_resp", "temperature", "batch_size", "dtype", *keys)
        },
    }


def _alignez_data(
    load: Callable[[], tuple[Any, Any]],
    config: AlignEZConfig,
    model_name: str,
    model_settings: ModelConfig | None,
    work: Path,
    seed: int,
) -> AlignEZData:
    """The self-generated AlignEZ data from `work` if made there with these settings, else made by the model `load()` gives."""

    def make() -> dict[str, list[dict]]:
        model, tokenizer = load()
        data = generate_alignez_data(
            model,
            tokenizer,
            _prompts(config, seed),
            config.keywords,
            max_new_tokens_char=config.max_new_tokens_char,
            max_new_tokens_resp=config.max_new_tokens_resp,
            temperature=config.temperature,
            seed=seed,
            batch_size=config.batch_size,
        )
        return {"pairs": data.pairs, "plain": data.plain, "characteristics": data.characteristics}

    settings = _data_settings(model_name, model_settings, config, seed, ("keywords", "max_new_tokens_char"))
    return AlignEZData(**cached_rows(work, "alignez_data", settings, make))


def alignez_seed_pairs(
    model_name: str,
    config: AlignEZConfig | None,
    work_dir: str | Path,
    seed: int = RecipeConfig.seed,
    model_settings: ModelConfig | None = None,
) -> list[dict]:
    """AlignEZ's self-generated (y+, y-) pairs as seed-DPO data with no human label, in pairs.jsonl format.

    `config` holds the AlignEZ settings (None: the defaults). Called with the run's own AlignEZ
    `init`, seed and `work_dir_for(RUN/init/model)`, it returns
    the pairs the init stage generated instead of sampling again; otherwise it samples them from
    `model_name` (the whole AlignEZ data set, plain responses included, so that an AlignEZ build
    with the same settings reuses it in turn). Every margin is 0.0: at the seed stage the policy is
    pi_init itself, so every implicit reward beta * (logp_policy - logp_reference) is 0.
    """
    config = config or AlignEZConfig()
    if not isinstance(config, AlignEZConfig):
        raise SelfieError(f"AlignEZ seed pairs need AlignEZ settings, got init.method '{config.method}'")
    load = lambda: _load(model_name, config.dtype, model_settings)  # noqa: E731
    return _alignez_data(load, config, model_name, model_settings, Path(work_dir), seed).pairs


def _build_alignez(
    model, tokenizer, config: AlignEZConfig, model_name: str, model_settings: ModelConfig | None, work: Path, seed: int
) -> dict:
    start = time.perf_counter()
    data = _alignez_data(lambda: (model, tokenizer), config, model_name, model_settings, work, seed)
    middle = time.perf_counter()
    edits, info = alignez_edits(model, tokenizer, data, config, seed)
    fold_edits(model, edits, config.location)
    return {**info, "seconds": {"data": round(middle - start, 2), "edit": round(time.perf_counter() - middle, 2)}}


def _build_rahf(
    model, tokenizer, config: RAHFConfig, model_name: str, model_settings: ModelConfig | None, work: Path, seed: int
) -> tuple[Any, dict]:
    def make() -> dict[str, list[dict]]:
        prompts = _prompts(config, seed)
        answers = model_answers(
            model,
            tokenizer,
            [row["prompt"] for row in prompts],
            max_new_tokens=config.max_new_tokens_resp,
            temperature=config.temperature,
            seed=seed,
            batch_size=config.batch_size,
            desc="rahf responses",
        )
        return {
            "responses": [
                {"prompt_id": row["prompt_id"], "prompt": row["prompt"], "responses": [text], "finished": [done]}
                for row, (text, done) in zip(prompts, answers)
            ]
        }

    start = time.perf_counter()
    rows = cached_rows(work, "rahf_data", _data_settings(model_name, model_settings, config, seed, ()), make)["responses"]
    middle = time.perf_counter()
    model, info = rahf_model(model, tokenizer, [r["prompt"] for r in rows], [r["responses"][0] for r in rows], config, seed)
    return model, {**info, "seconds": {"data": round(middle - start, 2), "edit": round(time.perf_counter() - middle, 2)}}


def build_edited_model(
    config: EditConfig,
    model_name: str,
    output_dir: str | Path,
    seed: int = RecipeConfig.seed,
    model_settings: ModelConfig | None = None,
) -> Path:
    """Build the edited model that `config` (a recipe's `init:`) describes into `output_dir` and return it, from
    `model_name` loaded as `model_settings` (the recipe's model: section, if any) says.

    The directory is a plain transformers model (safetensors + tokenizer) that needs no selfie code.
    """
    output_dir = Path(output_dir)
    method = config.method
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "method"}
    provenance = {"method": method, "model": model_name, "seed": seed, "init": settings}
    if loading := _loading_record(model_settings):
        provenance["loading"] = loading
    if is_saved_model(output_dir):
        _check_provenance(output_dir, provenance)
        logger.info("%s already holds the edited model; reusing it", output_dir)
        return output_dir
    torch.manual_seed(seed)
    model, tokenizer = _load(model_name, config.dtype, model_settings)
    work = work_dir_for(output_dir)
    if method == "alignez":
        provenance["result"] = _build_alignez(model, tokenizer, config, model_name, model_settings, work, seed)
    else:
        model, provenance["result"] = _build_rahf(model, tokenizer, config, model_name, model_settings, work, seed)
    return save_standalone(model, tokenizer, output_dir, provenance)


def _check_provenance(output_dir: Path, provenance: dict) -> None:
    path = output_dir / EDIT_FILE
    if not path.is_file():
        raise SelfieError(f"{output_dir}: holds a model that selfie did not build; choose another output directory")
    saved = read_json(path)

    def keyed(record: dict) -> dict:
        loading = {f"model.{k}": v for k, v in record.get("loading", {}).items()}
        return {**record.get("init", {}), **{k: record.get(k) for k in ("method", "model", "seed")}, **loading}

    expected, found = keyed(provenance), keyed(saved)
    differing = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
    if differing:
        name = differing[0] if "." in differing[0] else f"init.{differing[0]}"
        raise SelfieError(
            f"{output_dir}: was built with other settings ({name}: {found.get(differing[0])!r} there, "
            f"{expected.get(differing[0])!r} now); remove it or choose another output directory"
        )


def provenance_lines(provenance: dict) -> list[str]:
    """What the edit chose and measured, in a few lines (from its selfie_edit.json)."""
    r = provenance["result"]
    if provenance["method"] == "rahf":
        loss = r["held_out_loss"]
        return [
            f"RAHF: layers {r['target_layers']}, {r['examples']} training / {r['held_out_examples']} held-out responses",
            f"held-out representation loss {loss['before']} -> {loss['after']}",
            f"training loss by tenths of the steps: {r['loss_curve']}",
        ]
    margin = r["held_out_margin"]
    lines = [
        f"AlignEZ: {r['fit_pairs']} pairs fit the directions, {r['held_out_pairs']} held-out pairs choose the edit",
        f"held-out margin logp(y+) - logp(y-): {margin['unedited']} unedited -> {margin['edited']} edited (nats); "
        f"KL estimate {r['kl']} nats/token (budget {r['max_kl']})",
    ]
    if not r["layers"]:
        return lines + [
            "no candidate within the KL budget beat the unedited model on the held-out pairs: the model is left as it was"
        ]
    cosines = {layer: r["cosine_plus_minus"][layer] for layer in r["layers"]}
    return lines + [
        f"layers {r['layers']}, alpha {r['alpha']}; cos(u+, u-) {cosines} (near-parallel above "
        f"{r['parallel_cosine']}: boost the y+ vs y- direction instead); rule {r['rule']}"
    ]
