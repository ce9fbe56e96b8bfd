"""Judges served over HTTP: reward models (OpenRLHF's remote contract, vLLM's /classify) and LLM judges on any
OpenAI-compatible server, pointwise and pairwise (docs/JUDGES.md).

Specs (`kind:URL[?option=value&...]`):
    remote-rm:URL     POST {"query": [rendered prompt + response], "prompts": [...], "labels": [...]} to URL, read
                      {"rewards": [...]} (OpenRLHF's --reward.remote_url). `tokenizer=PATH` renders the query with
                      that tokenizer's chat template (else "prompt\\n\\nresponse").
    classify:URL      vLLM's /classify on the server at URL with `model=NAME`: the raw logit of a
                      sequence-classification reward model (use_activation false).
    llm-score:URL     an LLM on the OpenAI-compatible server at URL (…/v1) asked with a pointwise template.
    llm-pair:URL      the same with a pairwise template, each pair asked in both orders.
Options of every kind: api_key_env (the variable holding the key), timeout (s), retries, concurrency. LLM judges:
model (required), template, verdict (text | logprobs), max_tokens, seed, top_logprobs.

A verdict that cannot be read scores NaN: its prompt gives no pair (counted as `unjudged`), its evaluation row is
left out and counted. A server that is down or answers nonsense is an error naming the URL, after the retries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from urllib.parse import parse_qsl

from transformers import AutoTokenizer

from selfie.errors import SelfieError
from selfie.evaluation.http import AnswerLog, Endpoint, ask_all, request_json
from selfie.evaluation.judge_inputs import check_lengths, prompt_groups, question_text, reward_model_text
from selfie.evaluation.judge_templates import PAIR, SCORE, VERDICTS, Template, load_template

HTTP_KINDS = ("remote-rm", "classify", "llm-score", "llm-pair")
ENDPOINT_OPTIONS = {"api_key_env": str, "timeout": float, "retries": int, "concurrency": int}
LLM_OPTIONS = {"model": str, "template": str, "verdict": str, "max_tokens": int, "seed": int, "top_logprobs": int}
OPTIONS = {"remote-rm": {"tokenizer": str}, "classify": {"model": str}, "llm-score": LLM_OPTIONS, "llm-pair": LLM_OPTIONS}
ZERO_ALLOWED = {"retries", "seed"}
NEEDS_MODEL = {"classify", "llm-score", "llm-pair"}  # the served model's name goes into every request
DEFAULT_TEMPLATE = {"llm-score": "points-5", "llm-pair": "alpaca-eval"}


def parse_options(kind: str, target: str) -> tuple[Endpoint, dict]:
    """(the endpoint, the kind's own options) of `URL?option=value&...`; unknown options and bad values refused."""
    url, _, query = target.partition("?")
    if not url.startswith(("http://", "https://")):
        raise SelfieError(f"expected {kind}:http(s)://HOST:PORT/...[?option=value&...], got '{url}'")
    known = ENDPOINT_OPTIONS | OPTIONS[kind]
    values: dict = {}
    for name, raw in parse_qsl(query, keep_blank_values=True):
        if name not in known:
            raise SelfieError(f"unknown option '{name}' (known: {', '.join(sorted(known))})")
        try:
            values[name] = known[name](raw)
        except ValueError:
            raise SelfieError(f"option '{name}' must be {known[name].__name__}, got '{raw}'") from None
        if known[name] is not str and values[name] < (0 if name in ZERO_ALLOWED else 1e-9):
            raise SelfieError(f"option '{name}' must be {'>= 0' if name in ZERO_ALLOWED else 'positive'}, got '{raw}'")
    if kind in NEEDS_MODEL and "model" not in values:
        raise SelfieError("option 'model' is required (the served model's name, as /v1/models lists it)")
    endpoint = Endpoint(url, **{k: values.pop(k) for k in list(values) if k in ENDPOINT_OPTIONS})
    return endpoint, values


def _require(answer: dict, test: Callable[[dict], object], what: str) -> None:
    try:
        ok = test(answer)
    except (KeyError, IndexError, TypeError):
        ok = False
    if not ok:
        raise SelfieError(f"the server's answer has no {what}: {str(answer)[:160]}")


# ---- reward models


class RemoteRewardJudge:
    """OpenRLHF's remote reward model contract, one query per request (so that a resumed stage's requests are the
    ones it logged)."""

    def __init__(self, endpoint: Endpoint, options: dict, log: AnswerLog):
        self.endpoint, self.log = endpoint, log
        self.tokenizer = AutoTokenizer.from_pretrained(options["tokenizer"]) if "tokenizer" in options else None

    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        check_lengths(prompts, responses)
        bodies = [
            {"query": [reward_model_text(self.tokenizer, p, r)], "prompts": [question_text(p)], "labels": [""]}
            for p, r in zip(prompts, responses)
        ]
        return [float(a["rewards"][0]) for a in ask_all(self.endpoint, "", bodies, self.log, self._check)]

    @staticmethod
    def _check(answer: dict) -> None:
        _require(answer, lambda a: math.isfinite(float(a["rewards"][0])), "'rewards' list of numbers")


class ClassifyJudge:
    """vLLM's /classify: a sequence-classification reward model's raw logit for prompt + response."""

    def __init__(self, endpoint: Endpoint, options: dict, log: AnswerLog):
        self.endpoint, self.model, self.log = endpoint, options["model"], log
        self.served_model = self.model

    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        check_lengths(prompts, responses)
        bodies = [
            {"model": self.model, "messages": p + [{"role": "assistant", "content": r}], "use_activation": False}
            for p, r in zip(prompts, responses)
        ]
        answers = ask_all(self.endpoint, "classify", bodies, self.log, self._check)
        return [float(a["data"][0]["probs"][0]) for a in answers]

    @staticmethod
    def _check(answer: dict) -> None:
        _require(answer, lambda a: math.isfinite(float(a["data"][0]["probs"][0])), "data[0].probs[0] number")


# ---- LLM judges


@dataclass
class LLMAsker:
    """One verdict per filled template from a chat model, read as its template says."""

    endpoint: Endpoint
    template: Template
    model: str
    verdict: str
    max_tokens: int
    seed: int
    top_logprobs: int
    log: AnswerLog

    def body(self, text: str) -> dict:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": text}],
            "temperature": 0.0,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
        }
        if self.verdict == "logprobs":
            body |= {"logprobs": True, "top_logprobs": self.top_logprobs}
        return body

    def check(self, answer: dict) -> None:
        _require(answer, lambda a: isinstance(a["choices"][0]["message"]["content"], str), "choices[0].message.content")
        if self.verdict == "logprobs":
            _require(answer, lambda a: isinstance(a["choices"][0]["logprobs"]["content"][0]["top_logprobs"], list), "logprobs")

    def verdicts(self, texts: list[str]) -> tuple[list[float], str | None]:
        """Each text's verdict (NaN: unreadable) and the served model's id."""
        answers = ask_all(self.endpoint, "chat/completions", [self.body(t) for t in texts], self.log, self.check)
        values = [self.read(a["choices"][0]) for a in answers]
        return values, answers[0].get("model") if answers else None

    def read(self, choice: dict) -> float:
        if self.verdict == "logprobs":
            return self.template.read_logprobs(choice["logprobs"]["content"][0]["top_logprobs"])
        return self.template.read_text(choice["message"]["content"])


def _asker(kind: str, endpoint: Endpoint, options: dict, log: AnswerLog) -> LLMAsker:
    template = load_template(options.get("template", DEFAULT_TEMPLATE[kind]), SCORE if kind == "llm-score" else PAIR)
    verdict = options.get("verdict", template.verdict)
    if verdict not in VERDICTS:
        raise SelfieError(f"option 'verdict' must be one of {', '.join(VERDICTS)}, got '{verdict}'")
    if verdict == "logprobs" and not template.tokens:
        raise SelfieError(f"template '{template.name}' is read from text only (verdict=text)")
    max_tokens = options.get("max_tokens", 1 if verdict == "logprobs" else 512)
    return LLMAsker(
        endpoint, template, options["model"], verdict, max_tokens, options.get("seed", 0), options.get("top_logprobs", 20), log
    )


class LLMScoreJudge:
    """A pointwise LLM judge: each response's score is the template's verdict."""

    def __init__(self, asker: LLMAsker):
        self.asker, self.served_model = asker, None

    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        check_lengths(prompts, responses)
        texts = [self.asker.template.fill(question_text(p), r) for p, r in zip(prompts, responses)]
        scores, self.served_model = self.asker.verdicts(texts)
        return scores


class LLMPairJudge:
    """A pairwise LLM judge. A prompt's responses are compared pair by pair, each pair in both orders; a response's
    score under one order is its mean probability of beating the others, and its score is the mean over the two
    orders (`score_members` gives the two orders' scores: a pair's `agreement` is the share of orders that rank it
    as the mean does). A response alone with its prompt scores 0.5 (a tie with itself); a prompt with an
    unreadable verdict scores NaN throughout."""

    pairwise = True

    def __init__(self, asker: LLMAsker):
        self.asker, self.served_model = asker, None

    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        first, second = self.score_members(prompts, responses)
        return [(a + b) / 2 for a, b in zip(first, second)]

    def score_members(self, prompts: list[list[dict]], responses: list[str]) -> list[list[float]]:
        check_lengths(prompts, responses)
        groups = prompt_groups(prompts)
        asked = [(i, j) for idx in groups for i, j in combinations(idx, 2)]  # i presented first, then j
        fill = self.asker.template.fill
        texts = [fill(question_text(prompts[i]), responses[i], responses[j]) for i, j in asked]
        texts += [fill(question_text(prompts[i]), responses[j], responses[i]) for i, j in asked]
        verdicts, self.served_model = self.asker.verdicts(texts)
        forward, backward = verdicts[: len(asked)], verdicts[len(asked) :]
        wins: list[dict[int, list[float]]] = [{i: [] for i in range(len(prompts))} for _ in range(2)]
        for (i, j), p, q in zip(asked, forward, backward):  # p: P(i beats j) read forward; q: P(j beats i) read back
            wins[0][i].append(p)
            wins[0][j].append(1 - p)
            wins[1][i].append(1 - q)
            wins[1][j].append(q)
        members = [[sum(w[i]) / len(w[i]) if w[i] else 0.5 for i in range(len(prompts))] for w in wins]
        # one unreadable verdict leaves its whole prompt unjudged
        unjudged = {i for idx in groups if any(math.isnan(m[k]) for m in members for k in idx) for i in idx}
        return [[math.nan if i in unjudged else v for i, v in enumerate(m)] for m in members]


def load_http_judge(kind: str, target: str, log: AnswerLog):
    endpoint, options = parse_options(kind, target)
    if kind == "remote-rm":
        return RemoteRewardJudge(endpoint, options, log)
    if kind == "classify":
        return ClassifyJudge(endpoint, options, log)
    asker = _asker(kind, endpoint, options, log)
    return LLMScoreJudge(asker) if kind == "llm-score" else LLMPairJudge(asker)


def check_http_judge(kind: str, target: str) -> None:
    """The spec's form and options, the API key's variable, the template; then the server asked once: an LLM or
    /classify server must list the model (/v1/models), a remote reward model must score one query."""
    endpoint, options = parse_options(kind, target)
    endpoint.headers()
    if kind == "remote-rm":
        answer = request_json(endpoint, "", {"query": ["hello"], "prompts": ["hello"], "labels": [""]})
        RemoteRewardJudge._check(answer)
        return
    if kind != "classify":
        _asker(kind, endpoint, options, AnswerLog())  # the template and verdict checked
    models_url = "models" if kind != "classify" else "v1/models"
    listed = request_json(endpoint, models_url)
    names = [m.get("id") for m in listed.get("data", [])] if isinstance(listed, dict) else []
    if options["model"] not in names:
        raise SelfieError(f"the server at {endpoint.base_url} serves {names}, not '{options['model']}'")
