"""Writing a trained adapter: gathered whole from the ranks' shards, and in merge mode stacked onto the previous one."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import Trainer

from selfie.config.schema import ModelConfig
from selfie.models import load_model, save_adapter
from selfie.training.trainer import full_tensor


@contextlib.contextmanager
def _gathered(trainer: Trainer, params: list[torch.nn.Parameter]):
    """Full parameters on every rank under ZeRO-3 (no-op otherwise); every rank must enter."""
    plugin = trainer.accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    import deepspeed  # optional: only a DeepSpeed launch has it

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def gather_adapter(trainer: Trainer) -> tuple[PeftModel, dict[str, torch.Tensor]]:
    """(the trained PeftModel, its adapter "default" gathered whole on the CPU): a collective, every rank calls it
    while the trainer lives (ZeRO-3 and FSDP shard the weights)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = {n: p for n, p in model.named_parameters() if ".default." in n}
    with _gathered(trainer, list(params.values())):
        state = {n: full_tensor(p).detach().cpu() for n, p in params.items()}
    return model, state


def write_adapter(
    model: PeftModel,
    state: dict[str, torch.Tensor],
    directory: Path,
    fingerprint: str,
    base_name: str | None,
    stack_on: Path | None,
    settings: ModelConfig,
) -> None:
    """Write the gathered adapter to `directory`, atomically (the main process only).

    With `stack_on` (merge mode) the trained adapter sits on pi_init + that adapter merged; the written one is
    both concatenated (PEFT's "cat": rank r_prev + r, exact), so it applies to pi_init like every other adapter.
    """
    if stack_on is None:
        save_adapter(model, directory, state_dict=state, fingerprint=fingerprint)
        return
    trained = get_peft_model_state_dict(model, state_dict=state, adapter_name="default")
    stacked = PeftModel.from_pretrained(load_model(base_name, settings), str(stack_on), adapter_name="previous")
    stacked.add_adapter("trained", model.peft_config["default"])
    set_peft_model_state_dict(stacked, trained, adapter_name="trained")
    stacked.add_weighted_adapter(["previous", "trained"], [1.0, 1.0], "default", combination_type="cat")
    stacked.set_adapter("default")
    save_adapter(stacked, directory)
