"""The prompts an LLM judge is asked with, and how its verdict is read (selfie/evaluation/llm_judge.py).

A template is a user message with placeholders: `{question}` and `{answer}` for a pointwise judge (`llm-score:`),
`{question}`, `{answer_a}` and `{answer_b}` for a pairwise one (`llm-pair:`). Its verdict is read either from the
text (a pattern, at temperature 0) or from the first token's log-probabilities (the expected value over the
verdict tokens the server lists among its top log-probs, renormalised over those listed).

Shipped (selfie/resources/judge_templates/):
    self-rewarding  pointwise  Self-Rewarding's additive 5-point rubric, "Score: <points>"        text, 0-5
    points-5        pointwise  the same rubric answered with one digit                            logprobs, 0-5
    mt-bench        pointwise  MT-Bench's single-answer grading, "Rating: [[N]]"                   text, 1-10
    mt-bench-pair   pairwise   MT-Bench's pairwise prompt, "[[A]]", "[[B]]" or "[[C]]" (a tie)     text
    alpaca-eval     pairwise   AlpacaEval 2's classifier prompt, one token "m" or "M"             logprobs
A template file of one's own is read with the generic verdicts of its kind: pointwise "Score: N", "Rating: N" or
"[[N]]" (the last one in the text), or the digits 0-10 as first tokens; pairwise "[[A]]" / "[[B]]" / "[[C]]",
or "A" / "B" as first tokens.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from selfie.errors import SelfieError

SCORE, PAIR = "score", "pair"
PLACEHOLDERS = {SCORE: ("{question}", "{answer}"), PAIR: ("{question}", "{answer_a}", "{answer_b}")}
VERDICTS = ("text", "logprobs")


@dataclass(frozen=True)
class Template:
    name: str
    kind: str  # SCORE or PAIR
    text: str
    pattern: str  # the text verdict; its last match's group 1 is looked up in `values` (else read as a number)
    tokens: dict[str, float] = field(default_factory=dict)  # the logprobs verdict: first token -> value
    verdict: str = "text"  # how it is read unless the spec says otherwise
    values: dict[str, float] = field(default_factory=dict)  # text verdicts that are not numbers (A / B / C)
    low: float = 0.0  # a pointwise score outside [low, high] is not a verdict
    high: float = 10.0

    def fill(self, question: str, *answers: str) -> str:
        text = self.text.replace("{question}", question)
        names = ("{answer}",) if self.kind == SCORE else ("{answer_a}", "{answer_b}")
        for name, answer in zip(names, answers):
            text = text.replace(name, answer)
        return text

    def read_text(self, text: str) -> float:
        """The verdict's value (pairwise: the probability that the first answer is the better), NaN if none."""
        found = re.findall(self.pattern, text)
        if not found:
            return math.nan
        last = found[-1]
        if last in self.values:
            return self.values[last]
        value = float(last)
        return value if self.low <= value <= self.high else math.nan

    def read_logprobs(self, top: list[dict]) -> float:
        """The expected verdict over the verdict tokens among the first token's top log-probs, NaN if none is."""
        weights: dict[str, float] = {}
        for entry in top:
            token = entry["token"].strip()
            if token in self.tokens and token not in weights:
                weights[token] = math.exp(entry["logprob"])
        total = sum(weights.values())
        return sum(w * self.tokens[t] for t, w in weights.items()) / total if total > 0 else math.nan


DIGITS = {str(v): float(v) for v in range(11)}
AB = {"A": 1.0, "B": 0.0, "C": 0.5}
BUILT_IN = {
    "self-rewarding": dict(kind=SCORE, pattern=r"Score:\s*(\d+(?:\.\d+)?)", high=5.0),
    "points-5": dict(
        kind=SCORE, pattern=r"^\s*([0-5])\b", tokens={k: v for k, v in DIGITS.items() if v <= 5}, verdict="logprobs", high=5.0
    ),
    "mt-bench": dict(kind=SCORE, pattern=r"\[\[(\d+(?:\.\d+)?)\]\]", low=1.0),
    "mt-bench-pair": dict(kind=PAIR, pattern=r"\[\[([ABC])\]\]", values=AB),
    "alpaca-eval": dict(
        kind=PAIR, pattern=r"^\s*([mM])", values={"m": 1.0, "M": 0.0}, tokens={"m": 1.0, "M": 0.0}, verdict="logprobs"
    ),
}
OWN = {
    SCORE: dict(pattern=r"(?:Score:|Rating:|\[\[)\s*\[*\s*(\d+(?:\.\d+)?)", tokens=DIGITS),
    PAIR: dict(pattern=r"\[\[([ABC])\]\]", values=AB, tokens={"A": 1.0, "B": 0.0}),
}


def load_template(name: str, kind: str) -> Template:
    """A shipped template by name, or a template file (read with its kind's generic verdicts); errors in one line."""
    if name in BUILT_IN:
        settings = BUILT_IN[name]
        if settings["kind"] != kind:
            wanted = "llm-score" if settings["kind"] == SCORE else "llm-pair"
            raise SelfieError(f"template '{name}' is a {settings['kind']} template: use it with {wanted}:")
        text = (files("selfie") / "resources" / "judge_templates" / f"{name}.txt").read_text(encoding="utf-8")
        return Template(name=name, text=text, **settings)
    path = Path(name)
    if not path.is_file():
        raise SelfieError(f"template '{name}': neither a shipped template ({', '.join(BUILT_IN)}) nor a file")
    text = path.read_text(encoding="utf-8")
    missing = [p for p in PLACEHOLDERS[kind] if p not in text]
    if missing:
        raise SelfieError(
            f"template {path}: has no {' or '.join(missing)} (a {kind} template needs {', '.join(PLACEHOLDERS[kind])})"
        )
    return Template(name=str(path), kind=kind, text=text, **OWN[kind])
