"""Token ids as the chat template renders them: prompts, responses as judged and trained, stop and pad ids.

Generation, the implicit-reward judge, labelling by another judge, the trainer and the edits all encode
through here, so a response is the same tokens wherever it is sampled, scored or trained.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from selfie.errors import SelfieError


def chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of a conversation rendered by the chat template (the way TRL's DPO tokenizes it)."""
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def stop_token_ids(model: PreTrainedModel | GenerationConfig | None, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokenizer's EOS plus any end-of-turn ids in the generation config (e.g. Llama 3's <|eot_id|>)."""
    ids = {tokenizer.eos_token_id}
    config = model if isinstance(model, GenerationConfig) else getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    ids.discard(None)
    return ids


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that fills padded positions: the tokenizer's pad token, else its EOS (never attended to)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def response_token_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: list[dict], responses: Sequence[str], finished: Sequence[bool], stop_ids: set[int]
) -> tuple[list[int], list[list[int]]]:
    """(shared prompt ids, scored ids of each response) exactly as the chat template renders them.

    Like TRL's DPO tokenisation, a response's tokens start where the prompt (with the generation
    prompt) and prompt + assistant message diverge. They end at the template's end-of-turn token:
    included when the response finished, left out when it was cut at the length limit; whatever
    the template adds after it (ChatML's trailing newline) is not part of the response.
    """
    prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)
    full = [
        chat_ids(tokenizer, prompt + [{"role": "assistant", "content": text}], add_generation_prompt=False) for text in responses
    ]
    prefix = min(common_prefix_length(prompt_ids, ids) for ids in full)
    if prefix == 0:
        raise SelfieError("judge: the chat template renders prompt and prompt + response with no common start")
    scored = []
    for ids, done in zip(full, finished):
        tail = ids[prefix:]
        end = next((i for i, t in enumerate(tail) if t in stop_ids), None)
        if end is None:  # a template that writes no end-of-turn token: the model stopped on EOS
            scored.append(tail + [tokenizer.eos_token_id] if done else tail)
        else:
            scored.append(tail[: end + 1] if done else tail[:end])
    return prompt_ids[:prefix], scored
