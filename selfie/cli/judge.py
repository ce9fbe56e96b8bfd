"""`selfie judge`: implicit-reward judgments and pairs of a responses file (selfie/labelling/implicit_reward.py)."""

from __future__ import annotations

import argparse

import torch

from selfie.cli.flags import add_options, from_args
from selfie.cli.model_args import add_policy_args
from selfie.config.schema import TRUNCATION_POLICIES, JudgeConfig, TrainConfig
from selfie.data import check_response_rows
from selfie.io import atomic_write_json, check_writable, read_jsonl
from selfie.labelling.implicit_reward import judge_responses
from selfie.models import load_policy
from selfie.run.lock import output_lock


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
        ["length_normalize", "truncated", "truncation_penalty", "length_penalty", "min_margin_quantile", "token_budget"],
        {
            "length_normalize": "divide log-probs by the response length",
            "truncated": f"a response cut at the length limit: never chosen (drop), scored minus --truncation-penalty "
            f"(penalize), or like any other (keep); one of {', '.join(TRUNCATION_POLICIES)}",
            "length_penalty": "alpha per response token subtracted from the reward, or 'auto'",
            "min_margin_quantile": "drop the pairs whose margin is below this quantile of the margins (0: keep all)",
            "token_budget": "padded tokens per batch",
        },
    )
    parser.add_argument("--metrics", default=None, help="write the metrics as JSON here")


def run_judge_command(args: argparse.Namespace) -> None:
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
        metrics = judge_responses(policy, tokenizer, responses, args.output, args.pairs, beta=args.beta, judge=judge)
        if args.metrics:
            atomic_write_json(args.metrics, metrics)
