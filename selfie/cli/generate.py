"""`selfie generate`: sample K responses per prompt of a prompt file (selfie/generation/generate.py)."""

from __future__ import annotations

import argparse
import dataclasses

import torch

from selfie.cli.flags import add_options, from_args
from selfie.cli.model_args import add_policy_args
from selfie.config.schema import GenerateConfig, RecipeConfig
from selfie.data import load_prompts
from selfie.generation.generate import generate_responses, load_generator
from selfie.io import check_writable
from selfie.run.lock import output_lock


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    add_policy_args(
        parser,
        model="hub id, local directory, .gguf file or built-in alias",
        adapter="PEFT adapter directory to sample from (default: the bare model)",
        adapter_required=False,
        reads=("--prompts", ".jsonl/.json/.parquet file, saved dataset dir, hub id or 'demo'"),
        writes="responses.jsonl to write",
    )
    # the recipe's generate: section, seed and model.dtype, with their defaults
    add_options(
        parser,
        GenerateConfig,
        [f.name for f in dataclasses.fields(GenerateConfig)],
        {
            "num_responses": "responses per prompt (K)",
            "temperature": "0 = greedy",
            "batch_size": "sequences decoded together",
            "backend": "static batches, transformers' continuous batching, auto (measure both, keep the faster), "
            "or vllm (vLLM's engine in its own environment: $SELFIE_VLLM_PYTHON)",
        },
    )
    add_options(parser, RecipeConfig, ["seed"])


def run_generate_command(args: argparse.Namespace) -> None:
    g = from_args(GenerateConfig, args)  # the cross-key checks of the recipe's section
    check_writable(args.output, directory=False)
    prompts = load_prompts(args.prompts)
    with output_lock(args.output):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_generator(args.model, args.adapter, args.dtype, g.backend, device)
        generate_responses(
            model,
            tokenizer,
            prompts,
            args.output,
            num_responses=g.num_responses,
            max_new_tokens=g.max_new_tokens,
            temperature=g.temperature,
            top_p=g.top_p,
            seed=args.seed,
            batch_size=g.batch_size,
            backend=g.backend,
        )
