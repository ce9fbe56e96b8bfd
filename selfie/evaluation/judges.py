"""Judges: anything that scores (prompt messages, response text) pairs, behind one interface.

Specs (`load_judge`):
- `reward-model:PATH_OR_HUB_ID`   a transformers sequence-classification model with one output (num_labels=1);
                                   the text is its own tokenizer's chat template, else "prompt\\n\\nresponse".
- `callable:module.path:function`  a Python function (prompt_messages, response_text) -> float.
- `implicit:MODEL@ADAPTER_DIR`     the DPO implicit reward beta * (logp_policy - logp_reference), policy = MODEL with
                                   the adapter, reference = MODEL without it (one copy of the weights). Append
                                   `?beta=0.2` to change beta (default 0.1). Without `@ADAPTER_DIR` there is no
                                   reference and the score is beta * logp_MODEL (the paper's "no reference" judge).
- `remote-rm:URL`, `classify:URL?model=NAME`, `llm-score:URL?model=NAME`, `llm-pair:URL?model=NAME`
                                   judges served over HTTP (selfie/evaluation/remote_judges.py).
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from selfie.config.schema import JudgeConfig, TrainConfig
from selfie.errors import SelfieError
from selfie.evaluation.http import AnswerLog
from selfie.evaluation.judge_inputs import check_lengths, prompt_groups, reward_model_text
from selfie.evaluation.remote_judges import HTTP_KINDS, check_http_judge, load_http_judge
from selfie.labelling.implicit_reward import implicit_rewards, tokenised
from selfie.models import load_model_config, load_policy, resolve_dtype, resolve_model_path
from selfie.tokens import pad_token_id

logger = logging.getLogger(__name__)


class Judge(Protocol):
    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float]: ...


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class RewardModelJudge:
    """A sequence-classification reward model; scores the pooled logit of the last non-pad token."""

    def __init__(self, name: str, batch_size: int = 8, max_length: int = 2048, dtype: str = "auto"):
        path = check_reward_model(name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=resolve_dtype(dtype))
        except (OSError, ValueError, RuntimeError) as e:
            raise SelfieError(f"judge 'reward-model:{name}': cannot load ({str(e).splitlines()[0][:200]})") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # batched pooling finds the last token via the pad id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"  # positions start at 0 for every row
        self.tokenizer.truncation_side = "left"  # keep the end of the response, where the score is read
        self.model.to(_device()).eval()
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        check_lengths(prompts, responses)
        texts = [reward_model_text(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch: less padding
        scores = [0.0] * len(texts)
        special = not self.tokenizer.chat_template  # a chat template writes its own special tokens
        for start in tqdm(range(0, len(order), self.batch_size), desc="reward model", unit="batch", disable=None):
            idx = order[start : start + self.batch_size]
            batch = self.tokenizer(
                [texts[i] for i in idx],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=special,
            ).to(self.model.device)
            logits = self.model(**batch).logits[:, 0].float().cpu().tolist()
            for i, value in zip(idx, logits):
                scores[i] = value
        return scores


def check_reward_model(name: str) -> str:
    """The reward model's path or hub id, once its config shows one output (num_labels=1); no weights are read."""
    labels = load_model_config(name).num_labels
    if labels != 1:
        raise SelfieError(f"judge 'reward-model:{name}': needs num_labels=1, the model has {labels}")
    return resolve_model_path(name)


class CallableJudge:
    def __init__(self, fn: Callable[[list[dict], str], float], spec: str):
        self.fn, self.spec = fn, spec

    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        check_lengths(prompts, responses)
        scores = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            try:
                value = self.fn(prompt, response)
            except Exception as e:  # the user's code: its failure is bad input, reported in one line (-v: traceback)
                raise SelfieError(
                    f"judge '{self.spec}' raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                    f"on row {i} (prompt {prompt[-1]['content'][:60]!r}, response {response[:60]!r})"
                ) from e
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise SelfieError(f"judge '{self.spec}': returned {value!r} for row {i}, expected a number") from None
            if not math.isfinite(value):
                raise SelfieError(f"judge '{self.spec}': returned {value} for row {i}, expected a finite number")
            scores.append(value)
        return scores


class ImplicitJudge:
    """beta * (logp(y|x) under MODEL+adapter - logp(y|x) under MODEL alone), log-probs summed over response tokens.

    Scored by selfie.labelling.implicit_reward.implicit_rewards, so the tokenisation (EOS included: a response given
    here counts as finished) and the packing of a prompt's responses are the loop's own.
    """

    def __init__(
        self,
        model_name: str,
        adapter: str | None,
        beta: float = TrainConfig.beta,
        dtype: str = "auto",
        token_budget: int = JudgeConfig.token_budget,
    ):
        self.model, self.tokenizer = load_policy(model_name, adapter, dtype)
        self.model.to(_device())
        self.has_adapter, self.beta, self.token_budget = adapter is not None, beta, token_budget

    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        check_lengths(prompts, responses)
        groups = prompt_groups(prompts)  # one row per distinct prompt: its responses share the prompt's forward pass
        rows = [
            {"prompt": prompts[idx[0]], "responses": [responses[i] for i in idx], "finished": [True] * len(idx)} for idx in groups
        ]
        items = tokenised(self.model, self.tokenizer, rows)
        judged, _ = implicit_rewards(
            self.model, items, pad_token_id(self.tokenizer), beta=self.beta, token_budget=self.token_budget
        )
        scores = [0.0] * len(prompts)
        for idx, j in zip(groups, judged):
            values = j["rewards"] if self.has_adapter else [self.beta * v for v in j["policy_logps"]]
            for i, value in zip(idx, values):
                scores[i] = value
        return scores


def _load_callable(target: str, spec: str) -> CallableJudge:
    module_name, _, fn_name = target.rpartition(":")
    if not module_name or not fn_name:
        raise SelfieError(f"judge '{spec}': expected callable:module.path:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SelfieError(f"judge '{spec}': cannot import module '{module_name}' ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise SelfieError(f"judge '{spec}': module '{module_name}' has no callable '{fn_name}'")
    return CallableJudge(fn, spec)


def _implicit_args(target: str, spec: str) -> tuple[str, str | None, float]:
    """(model, adapter dir or None, beta) of an implicit:MODEL[@ADAPTER_DIR][?beta=B] spec."""
    body, _, query = target.partition("?")
    model_name, _, adapter = body.partition("@")
    if not model_name:
        raise SelfieError(f"judge '{spec}': expected implicit:MODEL[@ADAPTER_DIR][?beta=B]")
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False)) if query else {}
    unknown = sorted(set(options) - {"beta"})
    if unknown:
        raise SelfieError(f"judge '{spec}': unknown option '{unknown[0]}' (known: beta)")
    try:
        beta = float(options.get("beta", TrainConfig.beta))
    except ValueError:
        raise SelfieError(f"judge '{spec}': beta must be a number, got '{options['beta']}'") from None
    if not beta > 0:
        raise SelfieError(f"judge '{spec}': beta must be positive, got {beta}")
    return model_name, adapter or None, beta


def _load_implicit(target: str, spec: str, dtype: str) -> ImplicitJudge:
    model_name, adapter, beta = _implicit_args(target, spec)
    return ImplicitJudge(model_name, adapter, beta, dtype)


def _check_implicit(target: str, spec: str) -> None:
    model_name, adapter, _ = _implicit_args(target, spec)
    load_model_config(model_name)
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise SelfieError(f"judge '{spec}': {adapter} is not an adapter directory (no adapter_config.json)")


def load_judge(spec: str, dtype: str = "auto", answers: str | Path | None = None) -> Judge:
    """Build a judge from its spec string (see the module docstring); a bad spec is an error naming it. A judge
    served over HTTP keeps the answers it receives in `answers` (JSON Lines), and a rerun asks only for the rest."""
    return _by_kind(
        spec,
        {
            "reward-model": lambda target: RewardModelJudge(target, dtype=dtype),
            "callable": lambda target: _load_callable(target, spec),
            "implicit": lambda target: _load_implicit(target, spec, dtype),
        }
        | {kind: lambda target, kind=kind: load_http_judge(kind, target, AnswerLog(answers)) for kind in HTTP_KINDS},
    )


def check_judge(spec: str) -> None:
    """What load_judge checks, without loading or running a model: the spec's form, a callable's module and
    function, a reward model's config (one output), an implicit judge's model config and adapter directory, a
    served judge's options and its server, asked once."""
    _by_kind(
        spec,
        {
            "reward-model": check_reward_model,
            "callable": lambda target: _load_callable(target, spec),
            "implicit": lambda target: _check_implicit(target, spec),
        }
        | {kind: lambda target, kind=kind: check_http_judge(kind, target) for kind in HTTP_KINDS},
    )


KINDS = ("reward-model", "callable", "implicit", *HTTP_KINDS)


def _by_kind(spec: str, makers: dict[str, Callable[..., object]]):
    """makers[kind](target) for a spec `kind:target`; every error names the spec."""
    if not isinstance(spec, str):
        raise SelfieError(f"judge {spec!r}: a judge spec is a string such as 'reward-model:PATH'")
    kind, sep, target = spec.partition(":")
    if not sep or not target:
        raise SelfieError(f"judge '{spec}': expected KIND:TARGET, KIND one of {', '.join(KINDS)}")
    try:
        if kind in makers:
            return makers[kind](target)
    except SelfieError as e:
        if spec in str(e):
            raise
        raise SelfieError(f"judge '{spec}': {e}") from None
    except OSError as e:  # e.g. a hub id that is neither cached nor reachable
        raise SelfieError(f"judge '{spec}': cannot load ({str(e).splitlines()[0][:200]})") from None
    raise SelfieError(f"judge '{spec}': unknown kind '{kind}' ({', '.join(KINDS)})")
