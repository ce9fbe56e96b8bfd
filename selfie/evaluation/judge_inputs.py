"""What a judge reads of a (prompt messages, response) pair, whoever serves it (judges.py, remote_judges.py)."""

from __future__ import annotations

import json

from transformers import PreTrainedTokenizerBase

from selfie.errors import SelfieError


def check_lengths(prompts: list, responses: list) -> None:
    if len(prompts) != len(responses):
        raise SelfieError(f"judge: {len(prompts)} prompts but {len(responses)} responses")


def reward_model_text(tokenizer: PreTrainedTokenizerBase | None, prompt: list[dict], response: str) -> str:
    """The conversation a reward model scores: under the tokenizer's chat template, else "prompt\\n\\nresponse"."""
    if tokenizer is not None and tokenizer.chat_template:
        return tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
    return "\n\n".join(m["content"] for m in prompt) + "\n\n" + response


def question_text(prompt: list[dict]) -> str:
    """The question an LLM judge reads: the user's message, or the whole conversation as `role: content` lines."""
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def prompt_groups(prompts: list[list[dict]]) -> list[list[int]]:
    """The indices of each distinct prompt's rows, in order of first appearance: a prompt's responses judged together."""
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(json.dumps(prompt, sort_keys=True), []).append(i)
    return list(groups.values())
