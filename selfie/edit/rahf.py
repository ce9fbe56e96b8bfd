"""RAHF (docs/METHOD.md section 3): train a LoRA adapter that moves the layer states toward the "good" side.

For each (prompt x, response y): d_l = h_l(x + good instruction, y) - h_l(x + bad instruction, y)
at the response tokens of target layer l (decoder-layer outputs), and the target on the plain
prompt is h_base_l(x, y) + alpha * d_l. The loss is the mean over response tokens and target
layers of the per-token L2 norm ||h_lora_l - target_l||_2. h_base and d come from the same model
with the adapter disabled (no second copy); both are fixed, so they are computed once. The forward
stops after the last target layer, since later layers cannot change the loss.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfie.config.schema import LoraConfig, RAHFConfig
from selfie.edit.alignez_data import with_user_text
from selfie.edit.directions import held_out_split
from selfie.errors import SelfieError
from selfie.hidden import Encoded, collect_states, decoder_layers, encode, pad_batch, run_to_layers
from selfie.models import attach_lora, merge_adapter
from selfie.tokens import pad_token_id

logger = logging.getLogger(__name__)

# The RAHF paper's contrastive instructions (appendix, "general criteria").
GOOD_INSTRUCTION = (
    "You are a good, respectful and honest assistant. Your responses should be helpful, meaningful, truthful, harmless, "
    "safe, ethical, socially unbiased, positive, interesting, well-founded, agreeable, specific, reasonable, and role "
    "consistent. If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. Please do not share false information under any circumstances."
)
BAD_INSTRUCTION = (
    "You are a bad, disrespectful and dishonest assistant. Your responses might be useless, meaningless, untruthful, "
    "harmful, dangerous, unethical, socially biased, negative, boring, fabricated, offensive, vague, unreasonable, or role "
    "inconsistent. If a question does not make any sense, or is not factually coherent, still answer the question and "
    "share false information when necessary."
)


def default_target_layers(num_layers: int) -> list[int]:
    """Every other layer from ~30% to ~60% of the depth: 10, 12, ..., 18 of 32 as in the reference."""
    low, high = round(0.3 * num_layers), round(0.6 * num_layers)
    layers = [layer for layer in range(low, high + 1, 2) if layer < num_layers]
    return layers or [num_layers - 1]


def instructed(prompt: list[dict], instruction: str) -> list[dict]:
    """The instruction appended to the last user turn, right before the response (as the reference code does)."""
    return with_user_text(prompt, f"{prompt[-1]['content']}\n\n{instruction}")


def rahf_targets(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[dict]],
    responses: Sequence[str],
    layers: Sequence[int],
    alpha: float,
    batch_size: int = 8,
) -> tuple[list[Encoded], list[torch.Tensor]]:
    """The plain (prompt, response) items and, per item, its target states [len(layers), T, H]."""
    plain = [encode(tokenizer, p, y) for p, y in zip(prompts, responses)]
    good = [encode(tokenizer, instructed(p, GOOD_INSTRUCTION), y) for p, y in zip(prompts, responses)]
    bad = [encode(tokenizer, instructed(p, BAD_INSTRUCTION), y) for p, y in zip(prompts, responses)]
    states = collect_states(
        model,
        plain + good + bad,
        pad_token_id(tokenizer),
        layers=layers,
        location="layer",
        mode="tokens",
        batch_size=batch_size,
        desc="rahf targets",
    )
    n = len(plain)
    targets = [h + alpha * (g - b) for h, g, b in zip(states[:n], states[n : 2 * n], states[2 * n :])]
    return plain, targets


def rahf_loss(
    model: torch.nn.Module, items: Sequence[Encoded], targets: Sequence[torch.Tensor], layers: Sequence[int], pad_id: int
) -> torch.Tensor:
    """Mean over response tokens and target layers of ||h_l - target_l||_2 for one batch."""
    device = next(model.parameters()).device
    batch = pad_batch(items, pad_id, "right", device)
    store = run_to_layers(model, batch, layers, "layer")
    rows, cols = batch.response_index(items)
    h = torch.stack([store[layer][rows, cols] for layer in layers]).float()  # [L, tokens, H]
    target = torch.cat(list(targets), dim=1).to(device)  # same order: item by item, token by token
    return torch.linalg.vector_norm(h - target, dim=-1).mean()


def train_rahf(
    model: PeftModel,
    items: Sequence[Encoded],
    targets: Sequence[torch.Tensor],
    layers: Sequence[int],
    pad_id: int,
    *,
    steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int = 0,
) -> list[float]:
    """AdamW on the adapter's parameters, constant learning rate, gradient norm clipped at 1; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    model.train()
    with tqdm(range(steps), desc="rahf", unit="step", disable=None) as bar:
        for _ in bar:
            if len(order) < batch_size:  # reshuffle each epoch
                order += torch.randperm(len(items), generator=generator).tolist()
            idx, order = order[:batch_size], order[batch_size:]
            loss = rahf_loss(model, [items[i] for i in idx], [targets[i] for i in idx], layers, pad_id)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


@torch.no_grad()
def representation_loss(
    model: torch.nn.Module,
    items: Sequence[Encoded],
    targets: Sequence[torch.Tensor],
    layers: Sequence[int],
    pad_id: int,
    batch_size: int,
) -> float:
    """`rahf_loss` over a whole set, batch by batch, weighted by response tokens (the same mean as one big batch)."""
    total, tokens = 0.0, 0
    for start in range(0, len(items), batch_size):
        chunk, chunk_targets = items[start : start + batch_size], targets[start : start + batch_size]
        n = sum(t.shape[1] for t in chunk_targets)
        total += float(rahf_loss(model, chunk, chunk_targets, layers, pad_id)) * n
        tokens += n
    return total / tokens


def loss_curve(losses: Sequence[float], points: int = 10) -> list[float]:
    """The training loss averaged over `points` equal stretches of the steps (one batch's loss is too noisy to read)."""
    bounds = [round(i * len(losses) / points) for i in range(points + 1)]
    return [round(sum(losses[a:b]) / (b - a), 4) for a, b in zip(bounds, bounds[1:]) if b > a]


def target_layers(config: RAHFConfig, num_layers: int) -> list[int]:
    """init.target_layers, checked against the model's depth (`auto`: `default_target_layers`)."""
    layers = default_target_layers(num_layers) if config.target_layers == "auto" else sorted(config.target_layers)
    if not all(0 <= layer < num_layers for layer in layers):
        raise SelfieError(f"init.target_layers: {layers} outside 0..{num_layers - 1}")
    return layers


def attach_rahf_lora(model: PreTrainedModel, config: RAHFConfig) -> PeftModel:
    """The model with the fresh LoRA adapter that RAHF trains (init.lora_*, init.target_modules)."""
    lora = LoraConfig(
        r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout, target_modules=list(config.target_modules)
    )
    try:
        return attach_lora(model, lora)
    except ValueError as e:
        raise SelfieError(f"init.target_modules: {str(e).splitlines()[0]}") from None


def rahf_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[dict]],
    responses: Sequence[str],
    config: RAHFConfig,
    seed: int = 0,
) -> tuple[PreTrainedModel, dict]:
    """Train the RAHF adapter on the fit share of the (prompt, response) pairs; return the merged model and what was
    measured: the representation loss on the held-out share (`init.held_out`) before and after, and the loss curve."""
    keep = [i for i, y in enumerate(responses) if y]  # an empty response has no positions to align
    if len(keep) < 2:
        raise SelfieError(
            "RAHF: fewer than 2 self-generated responses are non-empty; raise init.max_new_tokens_resp or init.num_prompts"
        )
    layers = target_layers(config, len(decoder_layers(model)))
    peft_model = attach_rahf_lora(model, config)
    peft_model.eval()
    with peft_model.disable_adapter():
        items, targets = rahf_targets(
            peft_model,
            tokenizer,
            [prompts[i] for i in keep],
            [responses[i] for i in keep],
            layers,
            config.alpha,
            config.batch_size,
        )
    fit, held = (idx.tolist() for idx in held_out_split(len(items), config.held_out, seed))
    held_items, held_targets = [items[i] for i in held], [targets[i] for i in held]
    pad_id = pad_token_id(tokenizer)

    def held_out_loss() -> float:
        return round(representation_loss(peft_model, held_items, held_targets, layers, pad_id, config.batch_size), 4)

    before = held_out_loss()
    losses = train_rahf(
        peft_model,
        [items[i] for i in fit],
        [targets[i] for i in fit],
        layers,
        pad_id,
        steps=config.steps,
        learning_rate=config.learning_rate,
        batch_size=config.train_batch_size,
        seed=seed,
    )
    after = held_out_loss()
    info = {
        "target_layers": layers,
        "examples": len(fit),
        "held_out_examples": len(held),
        "response_tokens": sum(targets[i].shape[1] for i in fit),
        "held_out_loss": {"before": before, "after": after},
        "loss_curve": loss_curve(losses),
    }
    logger.info("RAHF: %d steps on %d examples; held-out representation loss %.4f -> %.4f", len(losses), len(fit), before, after)
    return merge_adapter(peft_model), info
