"""The judge stage's labeller: implicit rewards with one weight copy, then pairs (docs/METHOD.md sections 1.4, 1.5).

r(x, y) = beta * (logp_policy(y|x) - logp_reference(y|x)), logp summed over the response tokens
(EOS included when the response finished). The reference is the same weights with the adapter
switched off (`policy.disable_adapter()`), so one copy of the model serves both passes. (The judges
that score for evaluation or label with another scorer are selfie/evaluation/judges.py.)

Efficiency: a prompt and its K responses go through the model as ONE row, the responses side by
side after the shared prompt with an attention mask that lets each response see only the prompt
and itself (and position ids that restart after the prompt), so the prompt is computed once
instead of K times. Rows are sorted by length and batched by a token budget; the vocabulary
projection runs only at the positions that predict response tokens (selfie/projection.py).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfie.cli.flags import add_options, from_args
from selfie.cli.model_args import add_policy_args
from selfie.config.schema import JudgeConfig, TrainConfig
from selfie.data import check_response_rows, select_shard
from selfie.errors import SelfieError
from selfie.io import atomic_write_json, atomic_write_jsonl, check_writable, read_jsonl
from selfie.labelling.pairs import TRUNCATION_POLICIES, PairRules, select_pairs
from selfie.models import load_policy, unwrap_peft
from selfie.projection import logit_softcap, output_layer, token_logps
from selfie.tokens import pad_token_id, response_token_ids, stop_token_ids

logger = logging.getLogger(__name__)


@dataclass
class _Tree:
    """One prompt and its K responses, laid out as one row: [prompt | response_1 | ... | response_K]."""

    row: int
    prompt: list[int]
    responses: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompt) + sum(len(r) for r in self.responses)


def _token_budget_batches(trees: list[_Tree], token_budget: int) -> list[list[_Tree]]:
    """Longest first; a batch holds rows while rows x longest row <= budget (an over-long row goes alone)."""
    batches: list[list[_Tree]] = []
    for tree in sorted(trees, key=len, reverse=True):
        if batches and (len(batches[-1]) + 1) * len(batches[-1][0]) <= token_budget:
            batches[-1].append(tree)
        else:
            batches.append([tree])
    return batches


def _pack(batch: list[_Tree], pad_id: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Input ids, position ids and 4-D additive attention mask of the packed rows, plus where each scored token is.

    `source` is the position whose hidden state predicts a response token: the previous position,
    or the prompt's last position for a response's first token. `sequence` numbers the responses
    of the batch in order (tree by tree).
    """
    width = max(len(t) for t in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(batch), width), dtype=torch.long)
    segment = torch.full((len(batch), width), -1, dtype=torch.long)  # 0 = prompt, k = response k, -1 = padding
    rows, sources, targets, sequence = [], [], [], []
    n_seq = 0
    for b, tree in enumerate(batch):
        p = len(tree.prompt)
        ids[b, :p] = torch.tensor(tree.prompt)
        positions[b, :p] = torch.arange(p)
        segment[b, :p] = 0
        start = p
        for k, resp in enumerate(tree.responses, 1):
            r = len(resp)
            if r:
                ids[b, start : start + r] = torch.tensor(resp)
                positions[b, start : start + r] = torch.arange(p, p + r)
                segment[b, start : start + r] = k
                rows += [b] * r
                sources += [p - 1] + list(range(start, start + r - 1))
                targets += resp
                sequence += [n_seq] * r
            start += r
            n_seq += 1
    # Each position attends to earlier positions of the prompt or of its own segment (padding to the
    # prompt and earlier padding: never an empty row, and no real token comes after padding).
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & ((segment.unsqueeze(2) == segment.unsqueeze(1)) | (segment.unsqueeze(1) == 0))
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return {
        "input_ids": ids.to(device),
        "position_ids": positions.to(device),
        "attention_mask": mask.to(device),
        "rows": as_tensor(rows),
        "sources": as_tensor(sources),
        "targets": as_tensor(targets),
        "sequence": as_tensor(sequence),
        "num_sequences": n_seq,
    }


def _sequence_logps(model: PreTrainedModel, packed: dict) -> torch.Tensor:
    """Summed log-prob of every response in the packed batch (float64, on CPU)."""
    hidden = model.get_decoder()(
        input_ids=packed["input_ids"],
        position_ids=packed["position_ids"],
        attention_mask=packed["attention_mask"],
        use_cache=False,
    ).last_hidden_state
    states = hidden[packed["rows"], packed["sources"]]
    head = output_layer(model)
    logps = token_logps([(1.0, states)], packed["targets"], head.weight, head.bias, logit_softcap(model))
    sums = torch.zeros(packed["num_sequences"], dtype=torch.float64, device=states.device)
    sums.index_add_(0, packed["sequence"], logps.double())
    return sums.cpu()


@torch.inference_mode()
def judge_responses(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    responses: list[dict],
    output: str | Path,
    pairs_output: str | Path | None,
    *,
    beta: float = TrainConfig.beta,
    length_normalize: bool = JudgeConfig.length_normalize,
    rules: PairRules = PairRules(),
    token_budget: int = JudgeConfig.token_budget,
    shard: tuple[int, int] = (0, 1),
) -> dict:
    """Write judgments.jsonl (and pairs.jsonl, made by `rules`) for this shard's rows of `responses`; return metrics.

    `policy` is a PeftModel (reference = its base with the adapter disabled) or a plain model (then
    the reference is the policy itself and every reward is 0). With `length_normalize` the logps
    written are per-token means, so `rewards = beta * (policy_logps - reference_logps)` still holds.
    """
    if token_budget < 1:
        raise SelfieError(f"judge: token_budget must be >= 1 (got {token_budget})")
    check_response_rows(responses, "responses")
    rows = select_shard(responses, shard)
    model = unwrap_peft(policy)
    stop_ids, pad_id = stop_token_ids(model, tokenizer), pad_token_id(tokenizer)
    trees = [
        _Tree(i, *response_token_ids(tokenizer, row["prompt"], row["responses"], row["finished"], stop_ids))
        for i, row in enumerate(rows)
    ]
    param = next(model.parameters())
    policy.eval()

    logps: dict[int, tuple[list[float], list[float]]] = {}
    tokens = padded = 0  # positions run per pass, without / with padding
    start = time.perf_counter()
    with tqdm(total=len(trees), desc="judge", unit="prompt", disable=None) as bar:
        for batch in _token_budget_batches(trees, token_budget):
            packed = _pack(batch, pad_id, param.dtype, param.device)
            policy_logps = _sequence_logps(model, packed)
            if isinstance(policy, PeftModel):
                with policy.disable_adapter():
                    reference_logps = _sequence_logps(model, packed)
            else:
                reference_logps = policy_logps
            n = 0
            for tree in batch:
                k = len(tree.responses)
                logps[tree.row] = (policy_logps[n : n + k].tolist(), reference_logps[n : n + k].tolist())
                n += k
            tokens += sum(len(tree) for tree in batch)
            padded += packed["input_ids"].numel()
            bar.update(len(batch))
    seconds = time.perf_counter() - start

    judgments = []
    for tree, row in zip(trees, rows):
        pol, ref = logps[tree.row]
        counts = [len(r) for r in tree.responses]
        if length_normalize:
            pol = [v / max(c, 1) for v, c in zip(pol, counts)]
            ref = [v / max(c, 1) for v, c in zip(ref, counts)]
        judgments.append(
            {
                "prompt_id": row["prompt_id"],
                "rewards": [beta * (p - r) for p, r in zip(pol, ref)],
                "policy_logps": pol,
                "reference_logps": ref,
                "num_tokens": counts,
            }
        )
    atomic_write_jsonl(output, judgments)
    metrics = {
        "prompts": len(rows),
        "responses": sum(len(j["rewards"]) for j in judgments),
        "response_tokens": sum(sum(j["num_tokens"]) for j in judgments),
        "tokens": tokens,
        "padded_tokens": padded,
        "seconds": round(seconds, 3),
        "tokens_per_second": tokens / seconds if seconds else None,
    }
    if pairs_output is not None:
        pairs, label_metrics = select_pairs(rows, judgments, rules)
        atomic_write_jsonl(pairs_output, pairs)
        metrics.update(label_metrics, pairs_per_second=len(pairs) / seconds if seconds else None)
    logger.info("judged %d prompts in %.1f s -> %s", len(rows), seconds, output)
    return metrics


def add_judge_args(parser: argparse.ArgumentParser) -> None:
    add_policy_args(
        parser,
        model="the initial model pi_init (also the judge reference)",
        adapter="PEFT adapter of the policy that generated the responses",
        adapter_required=True,
        reads=("--responses", "responses.jsonl from `selfie generate`"),
        writes="judgments.jsonl to write",
    )
    parser.add_argument("--pairs", default=None, help="pairs.jsonl to write (TRL conversational preference format)")
    # the recipe's own keys and defaults, so `selfie judge` labels as `selfie run` does
    add_options(parser, TrainConfig, ["beta"], {"beta": "the implicit reward's beta (the recipe's train.beta)"})
    add_options(
        parser,
        JudgeConfig,
        ["length_normalize", "truncated", "truncation_penalty", "length_penalty", "token_budget"],
        {
            "length_normalize": "divide log-probs by the response length",
            "truncated": f"a response cut at the length limit: never chosen (drop), scored minus --truncation-penalty "
            f"(penalize), or like any other (keep); one of {', '.join(TRUNCATION_POLICIES)}",
            "length_penalty": "alpha per response token subtracted from the reward, or 'auto'",
            "token_budget": "padded tokens per batch",
        },
    )
    parser.add_argument("--metrics", default=None, help="write the metrics as JSON here")


def run_judge_command(args: argparse.Namespace) -> None:
    from selfie.run.rundir import output_lock

    judge = from_args(JudgeConfig, args)  # bad rules fail before the model loads
    for output in (args.output, args.pairs, args.metrics):
        if output:
            check_writable(output, directory=False)
    responses = read_jsonl(args.responses)
    check_response_rows(responses, str(args.responses))
    with output_lock(args.output):
        policy, tokenizer = load_policy(args.model, args.adapter, args.dtype)
        if torch.cuda.is_available():
            policy.to("cuda")
        metrics = judge_responses(
            policy,
            tokenizer,
            responses,
            args.output,
            args.pairs,
            beta=args.beta,
            length_normalize=judge.length_normalize,
            rules=judge.rules,
            token_budget=judge.token_budget,
        )
        if args.metrics:
            atomic_write_json(args.metrics, metrics)
