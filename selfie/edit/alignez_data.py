"""AlignEZ's self-generated preference data (docs/METHOD.md section 2.1), plus one plain response per prompt.

For each query q and keyword pair (pos, neg) the model first describes each persona's answer
("characteristics", ~50 tokens), then answers q as that persona (~200 tokens): (y+, y-) is a
preference pair with no human label. Every text goes to the model as a user message through its
chat template. The plain response y0 (q alone) is the neutral reference that alignez.py measures
the helpful and harmful directions from.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfie.edit.answers import model_answers
from selfie.errors import SelfieError

logger = logging.getLogger(__name__)

POLARITIES = ("positive", "negative")  # each job's two personas, in this order throughout
CHARACTERISTICS = {
    "positive": "{q}\nYou are a {keyword} assistant. Your answer to this query should: ",
    "negative": "{q}\nPretend you are a {keyword} assistant. Your response to this query should: ",
}
RESPONSE = {
    "positive": "You are a {keyword} assistant. Your answer should {characteristics}.\n{q}",
    "negative": "Pretend you are a {keyword} assistant. Your answer should {characteristics}.\n{q}",
}


def with_user_text(prompt: list[dict], text: str) -> list[dict]:
    """The conversation with its last (user) message replaced by `text`."""
    return prompt[:-1] + [{"role": "user", "content": text}]


def characteristics_prompt(prompt: list[dict], keyword: str, polarity: str) -> list[dict]:
    return with_user_text(prompt, CHARACTERISTICS[polarity].format(q=prompt[-1]["content"], keyword=keyword))


def response_prompt(prompt: list[dict], keyword: str, polarity: str, characteristics: str) -> list[dict]:
    text = RESPONSE[polarity].format(q=prompt[-1]["content"], keyword=keyword, characteristics=characteristics)
    return with_user_text(prompt, text)


@dataclass
class AlignEZData:
    pairs: list[dict]  # pairs.jsonl rows, chosen = y+, rejected = y-, margin 0.0 (no judge)
    plain: list[dict]  # responses.jsonl rows: one plain response per prompt
    characteristics: list[dict]  # {"prompt_id", "keywords", "positive", "negative"}


Job = tuple[dict, tuple[str, ...]]  # a prompt row and one (positive, negative) keyword pair


def persona_characteristics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    jobs: Sequence[Job],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int,
) -> list[str]:
    """Each job's positive then negative characteristics text, a trailing "." stripped."""
    char_prompts = [
        characteristics_prompt(row["prompt"], kw[i], polarity) for row, kw in jobs for i, polarity in enumerate(POLARITIES)
    ]
    answers = model_answers(
        model,
        tokenizer,
        char_prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        desc="characteristics",
    )
    return [text.rstrip(".") for text, _ in answers]


def persona_pairs(jobs: Sequence[Job], chars: list[str], responses: list[tuple[str, bool]]) -> tuple[list[dict], list[dict]]:
    """The usable (y+, y-) pairs as pairs.jsonl rows, and every job's characteristics row."""
    pairs, characteristics = [], []
    for j, (row, kw) in enumerate(jobs):
        (chosen, _), (rejected, _) = responses[2 * j], responses[2 * j + 1]
        characteristics.append(
            {"prompt_id": row["prompt_id"], "keywords": list(kw), "positive": chars[2 * j], "negative": chars[2 * j + 1]}
        )
        if not chosen or not rejected or chosen == rejected:  # no usable pair (empty or identical text)
            continue
        pairs.append(
            {
                "prompt_id": row["prompt_id"],
                "prompt": row["prompt"],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "margin": 0.0,
            }
        )
    return pairs, characteristics


def generate_alignez_data(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[dict],
    keywords: Sequence[Sequence[str]],
    *,
    max_new_tokens_char: int,
    max_new_tokens_resp: int,
    temperature: float,
    seed: int,
    batch_size: int,
) -> AlignEZData:
    """Characteristics, then persona responses and plain responses, for prompt rows {"prompt_id", "prompt"}."""
    jobs = [(row, tuple(kw)) for row in prompts for kw in keywords]
    chars = persona_characteristics(
        model, tokenizer, jobs, max_new_tokens=max_new_tokens_char, temperature=temperature, seed=seed, batch_size=batch_size
    )
    resp_prompts = [
        response_prompt(row["prompt"], kw[i], polarity, chars[2 * j + i])
        for j, (row, kw) in enumerate(jobs)
        for i, polarity in enumerate(POLARITIES)
    ]
    resp_prompts += [row["prompt"] for row in prompts]
    responses = model_answers(
        model,
        tokenizer,
        resp_prompts,
        max_new_tokens=max_new_tokens_resp,
        temperature=temperature,
        seed=seed + 1,
        batch_size=batch_size,
        desc="responses",
    )
    pairs, characteristics = persona_pairs(jobs, chars, responses)
    plain = [
        {"prompt_id": row["prompt_id"], "prompt": row["prompt"], "responses": [text], "finished": [done]}
        for row, (text, done) in zip(prompts, responses[2 * len(jobs) :])
    ]
    logger.info("self-generated %d preference pairs from %d prompts x %d keyword pairs", len(pairs), len(prompts), len(keywords))
    if len(pairs) < 2:
        raise SelfieError(
            f"AlignEZ: only {len(pairs)} usable self-generated pairs (empty or identical responses); "
            "raise init.num_prompts or init.max_new_tokens_resp"
        )
    return AlignEZData(pairs, plain, characteristics)
