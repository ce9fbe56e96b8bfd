"""Apply an AlignEZ edit (docs/METHOD.md section 2.5): inference hooks, or folded into the weights.

At each chosen layer, with orthonormal rows U- (harmful) and U+ (helpful):
    h <- h - U-^T U- h            (neutralise harmful)
    h <- h + alpha U+^T U+ h      (boost helpful)
i.e. h <- P h with P = (I + alpha U+^T U+)(I - U-^T U-). The removal is exact and the boost is a
pure (1 + alpha) scaling only when U+ is orthogonal to U-, which alignez.py ensures.

Folding: the MLP output of a layer is written by one linear map, `mlp.down_proj` (y = W x + b), so
W <- P W, b <- P b gives exactly the hooked model. The decoder-layer output (the residual stream
h_in + attention + MLP) is written by no single linear layer, so an edit there cannot be folded
exactly; `fold_edits` refuses it rather than fold an approximation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfie.errors import SelfieError
from selfie.hidden import edit_point
from selfie.io import atomic_directory, atomic_write_json

logger = logging.getLogger(__name__)

POSITIONS = ("all", "last")
EDIT_FILE = "selfie_edit.json"  # provenance of a saved edited model; plain transformers ignores it


@dataclass
class Edit:
    layer: int
    plus: torch.Tensor  # [k+, H] orthonormal rows (k+ may be 0)
    minus: torch.Tensor  # [k-, H] orthonormal rows (k- may be 0)
    alpha: float

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        minus, plus = self.minus.to(h), self.plus.to(h)
        h = h - (h @ minus.T) @ minus
        return h + self.alpha * (h @ plus.T) @ plus

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """P = (I + alpha U+^T U+)(I - U-^T U-), [H, H]."""
        plus, minus = self.plus.to(dtype), self.minus.to(dtype)
        eye = torch.eye(plus.shape[1], dtype=dtype)
        return (eye + self.alpha * plus.T @ plus) @ (eye - minus.T @ minus)


class EditHooks:
    """Forward hooks that apply edits at their layers' edit points; `remove()` (or leaving a `with`) undoes them."""

    def __init__(self, model: nn.Module, edits: Sequence[Edit], location: str = "mlp", positions: str = "all"):
        if positions not in POSITIONS:
            raise SelfieError(f"positions '{positions}': expected one of {', '.join(POSITIONS)}")
        # "last" edits only the newest position of each forward: in cached generation that is the
        # prompt's last token, then every generated token (the AlignEZ reference code's choice);
        # it assumes left padding, so that the last column is a real token in every row.
        self.handles = [
            edit_point(model, edit.layer, location).register_forward_hook(self._hook(edit, positions)) for edit in edits
        ]

    @staticmethod
    def _hook(edit: Edit, positions: str):
        def hook(module: nn.Module, args: tuple, output):
            h = output[0] if isinstance(output, tuple) else output
            if positions == "all":
                edited = edit(h)
            else:
                edited = torch.cat([h[:, :-1], edit(h[:, -1:])], dim=1)
            return (edited, *output[1:]) if isinstance(output, tuple) else edited

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self) -> EditHooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def writer_of(model: nn.Module, layer: int, location: str) -> nn.Linear:
    """The linear layer whose output is the edit point; only the MLP output has one."""
    if location != "mlp":
        raise SelfieError(
            f"cannot fold an edit at location '{location}' into the weights: the decoder-layer output is the residual "
            "stream h_in + attention + MLP, written by no single linear layer. Use location 'mlp' (exact folding into "
            "mlp.down_proj) or apply the edit with hooks at inference"
        )
    mlp = edit_point(model, layer, "mlp")
    down = getattr(mlp, "down_proj", None)
    if not isinstance(down, nn.Linear):
        raise SelfieError(
            f"layer {layer}: folding needs an nn.Linear `mlp.down_proj` that writes the MLP output, found {type(down).__name__}"
        )
    return down


@torch.no_grad()
def fold_edits(model: PreTrainedModel, edits: Sequence[Edit], location: str = "mlp") -> None:
    """W <- P W and b <- P b in each edited layer's down_proj (in float64, then back to the weight's dtype)."""
    for edit in edits:
        down = writer_of(model, edit.layer, location)
        p = edit.matrix().to(down.weight.device)
        down.weight.copy_((p @ down.weight.double()).to(down.weight.dtype))
        if down.bias is not None:
            down.bias.copy_((p @ down.bias.double()).to(down.bias.dtype))
    logger.info("folded edits into mlp.down_proj of layers %s", [edit.layer for edit in edits])


def is_saved_model(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any(
        (directory / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")
    )


def save_standalone(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output_dir: Path, provenance: dict) -> Path:
    """save_pretrained (safetensors) + tokenizer + provenance into a temp dir, renamed into place."""
    output_dir = Path(output_dir)
    with atomic_directory(output_dir) as tmp:  # replaces an incomplete earlier attempt (callers return complete ones)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / EDIT_FILE, provenance)
    logger.info("saved the edited model to %s", output_dir)
    return output_dir
