"""`selfie judge`: judgments and pairs of a responses file, by the implicit reward (selfie/labelling/implicit_reward.py)
or by any judge spec (`--judge`, selfie/evaluation/judges.py)."""

from __future__ import annotations

import argparse

import torch

from selfie.cli.flags import add_options, from_args
from selfie.cli.model_args import add_policy_args
from selfie.config.schema import TRUNCATION_POLICIES, JudgeConfig, TrainConfig
from selfie.data import check_response_rows
from selfie.errors import SelfieError
from selfie.evaluation.judges import check_judge, load_judge
from selfie.evaluation.labels import label_responses
from selfie.io import atomic_write_json, atomic_write_jsonl, check_writable, read_jsonl
from selfie.labelling.implicit_reward import judge_responses
from selfie.labelling.pairs import select_pairs
from selfie.models import load_generation_config, load_policy, load_tokenizer
from selfie.run.lock import output_lock
from selfie.tokens import stop_token_ids


def add_judge_args(parser: argparse.ArgumentParser) -> None:
    add_policy_args(
        parser,
        model="the initial model pi_init (also the judge reference; with --judge, the tokenizer that counts tokens)",
        adapter="PEFT adapter of the policy that generated the responses (the implicit reward's policy)",
        adapter_required=False,
        reads=("--responses", "responses.jsonl from `selfie generate`"),
        writes="judgments.jsonl to write",
    )
    parser.add_argument("--pairs", default=None, help="pairs.jsonl to write (TRL conversational preference format)")
    parser.add_argument(
        "--judge", default=None, help="score with this judge spec instead of the implicit reward (docs/JUDGES.md)"
    )
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
    if args.judge is None and args.adapter is None:
        raise SelfieError("--adapter is required for the implicit reward (or pass --judge SPEC)")
    for output in (args.output, args.pairs, args.metrics):
        if output:
            check_writable(output, directory=False)
    responses = read_jsonl(args.responses)
    check_response_rows(responses, str(args.responses))
    if args.judge is not None:
        check_judge(args.judge)  # a served judge's server is asked once, before anything is scored
    with output_lock(args.output):
        if args.judge is None:
            policy, tokenizer = load_policy(args.model, args.adapter, args.dtype)
            if torch.cuda.is_available():
                policy.to("cuda")
            metrics = judge_responses(policy, tokenizer, responses, args.output, args.pairs, beta=args.beta, judge=judge)
        else:
            metrics = _spec_judgments(args, responses, judge)
        if args.metrics:
            atomic_write_json(args.metrics, metrics)


def _spec_judgments(args: argparse.Namespace, responses: list[dict], rules: JudgeConfig) -> dict:
    """judgments.jsonl by the judge spec, resumable (a served judge's answers logged beside it), then the pairs."""
    tokenizer = load_tokenizer(args.model)
    stops = stop_token_ids(load_generation_config(args.model), tokenizer)
    scorer = load_judge(args.judge, args.dtype, answers=f"{args.output}.answers.jsonl")
    metrics = label_responses(scorer, responses, args.output, tokenizer, stops)
    if args.pairs:
        by_prompt = {row["prompt_id"]: row for row in read_jsonl(args.output)}
        pairs, label_metrics = select_pairs(responses, [by_prompt[r["prompt_id"]] for r in responses], rules.rules)
        atomic_write_jsonl(args.pairs, pairs)
        metrics.update(label_metrics)
    return metrics
