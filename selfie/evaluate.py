"""Judges (reward model, Python callable, implicit DPO reward) and evaluation reports.

The public face of the `selfie.evaluation` package:
- judges:   `Judge` (score(prompts, responses) -> list[float]), `load_judge(spec)` and `check_judge(spec)` (the same
            checks, no model loaded) with specs `reward-model:PATH_OR_HUB_ID`, `callable:module.path:function`, `implicit:MODEL[@ADAPTER_DIR][?beta=B]`.
- numbers:  `win_rate` (ties count half, 95% bootstrap interval), `judge_accuracy`, `score_responses` (labelling by a judge), `pair_agreement`.
- models:   `compare_models` (A vs B win rate), `run_scores` (mean score per iteration of a run directory),
            `evaluate_iteration` (the loop's eval stage; recipe section `eval:`).
- outputs:  `write_report` (report.json, report.md, report.png); CLI hooks `add_eval_args` / `run_eval_command`.
"""

from selfie.evaluation.cli import add_eval_args, run_eval_command
from selfie.evaluation.compare import EVAL_DEFAULTS, INIT, compare_models, eval_prompts, evaluate_iteration, run_scores
from selfie.evaluation.judges import CallableJudge, ImplicitJudge, Judge, RewardModelJudge, check_judge, load_judge
from selfie.evaluation.labels import judge_accuracy, pair_agreement, score_responses
from selfie.evaluation.report import write_report
from selfie.evaluation.stats import bootstrap_ci, win_rate

__all__ = [
    "EVAL_DEFAULTS", "INIT", "CallableJudge", "ImplicitJudge", "Judge", "RewardModelJudge", "add_eval_args", "bootstrap_ci",
    "check_judge",
    "compare_models", "eval_prompts", "evaluate_iteration", "judge_accuracy", "load_judge", "pair_agreement",
    "run_eval_command", "run_scores", "score_responses", "win_rate", "write_report",
]
