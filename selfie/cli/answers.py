"""`selfie answers`: a run's iteration (or any model and adapter) answering a benchmark's questions, written in the
file that benchmark reads (selfie/evaluation/answers.py)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

from selfie.cli.flags import add_iteration_arg, add_options
from selfie.config.schema import EvalOptions, ModelConfig
from selfie.errors import SelfieError
from selfie.evaluation.answers import FORMATS, AnswerSource, answer_rows, answer_turns, read_questions, write_answers
from selfie.evaluation.compare import generate_one
from selfie.export.policy import pick_iteration
from selfie.io import check_writable
from selfie.models import load_tokenizer, model_settings
from selfie.run.evaluation import run_eval_options
from selfie.run.lock import output_lock
from selfie.run.rundir import RunContext

logger = logging.getLogger(__name__)

DECODING = ["max_new_tokens", "temperature", "top_p", "batch_size", "backend", "dtype", "seed"]
HELP = {
    "temperature": "0 = greedy",
    "batch_size": "sequences decoded together",
    "backend": "generation backend: auto, static, continuous or vllm",
    "dtype": "auto, float32, bfloat16 or float16",
    "seed": "sampling seed",
}


@dataclasses.dataclass(frozen=True)
class Policy:
    """Who answers, and how."""

    model: str
    adapter: str | Path | None
    settings: str | ModelConfig  # how the model loads: a dtype, or the run's model: section
    options: EvalOptions  # its decoding
    system_prompt: str | None  # a run's data.system_prompt: it opens every question, as it opened the run's prompts
    name: str  # the generator name when --generator is not given


def add_answers_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="?", default=None, help="the run directory whose iteration answers (or --model)")
    add_iteration_arg(parser)
    parser.add_argument("--model", default=None, help="instead of a run: hub id, local directory, .gguf file or built-in alias")
    parser.add_argument("--adapter", default=None, help="PEFT adapter directory on --model (default: the bare model)")
    parser.add_argument("--questions", required=True, help="the benchmark's question file (.json list or .jsonl)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="the benchmark whose files are read and written")
    parser.add_argument("--output", required=True, help="answer file to write")
    parser.add_argument(
        "--generator", default=None, help="the model's name in the file (default: RUN_DIR's name + -iterN, or --model's name)"
    )
    decoding = parser.add_argument_group(
        "decoding", "the defaults shown are --model's; with RUN_DIR each defaults to the run's own (as its eval stage decodes)"
    )
    add_options(decoding, EvalOptions, DECODING, HELP)
    parser.set_defaults(**dict.fromkeys(DECODING, None))  # None: not given, so a run's own setting applies


def run_answers_command(args: argparse.Namespace) -> None:
    check_writable(args.output, directory=False)
    questions = read_questions(args.questions, args.format)
    policy = _run_policy(args) if args.run_dir is not None else _model_policy(args)
    generator = args.generator or policy.name
    with output_lock(args.output), tempfile.TemporaryDirectory(prefix="selfie-answers-") as tmp:

        def generate(prompts: list[dict], turn: int) -> list[str]:
            output = Path(tmp) / f"turn_{turn + 1}.jsonl"
            return generate_one(policy.model, policy.adapter, prompts, output, dtype=policy.settings, **policy.options.sampling())

        answers = answer_turns(questions, generate, policy.system_prompt)
        tokenizer = load_tokenizer(policy.model, model_settings(policy.settings))
        source = AnswerSource(generator, lambda text: len(tokenizer.encode(text, add_special_tokens=False)), time.time())
        write_answers(args.output, args.format, answer_rows(args.format, questions, answers, source))
    logger.info("%d answers of %s written to %s", len(questions), generator, args.output)


def _given(args: argparse.Namespace) -> dict:
    """The decoding flags on the command line."""
    return {name: getattr(args, name) for name in DECODING if getattr(args, name) is not None}


def _run_policy(args: argparse.Namespace) -> Policy:
    if args.model is not None or args.adapter is not None:
        raise SelfieError("pass a run directory or --model [--adapter], not both")
    ctx = RunContext.load(args.run_dir)
    t = pick_iteration(ctx, args.iteration)
    config = ctx.config
    options = dataclasses.replace(run_eval_options(config), **_given(args))
    settings = dataclasses.replace(config.model, dtype=options.dtype)
    name = f"{ctx.run_dir.resolve().name}-iter{t}"
    return Policy(ctx.pi_init, ctx.adapter(t), settings, options, config.data.system_prompt, name)


def _model_policy(args: argparse.Namespace) -> Policy:
    if args.model is None:
        raise SelfieError("pass a run directory or --model")
    if args.iteration is not None:
        raise SelfieError("--iteration applies to a run directory; with --model, --adapter names the policy")
    options = EvalOptions(**_given(args))
    return Policy(args.model, args.adapter, options.dtype, options, None, Path(args.model).name)
