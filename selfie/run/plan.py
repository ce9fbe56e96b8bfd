"""The stages of a run, declared once: each one's name, whether it runs once (iteration 0) or in every iteration,
whether the recipe asks for it, what it writes, whether it leaves trainer checkpoints and whether a killed run
resumes inside it. selfie/run/stages.py attaches the function that runs each (`@STAGE.runs`); the run directory,
the plan, the preflight, `selfie status` and the driver read this list. A new stage: one entry here, one function
there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfie.config.schema import RecipeConfig


def _always(config: RecipeConfig) -> bool:
    return True


@dataclass(eq=False)
class Stage:
    name: str
    every_iteration: bool  # runs in every iteration t >= 1; else once, in iteration 0
    writes: Callable[[Any, int], list[Path]]  # (RunContext, t) -> the artifacts the manifest records
    wanted: Callable[[RecipeConfig], bool] = _always  # whether the recipe runs it
    trains: bool = False  # leaves trainer checkpoints beside its adapter
    resumes_inside: bool = False  # a killed stage continues from its last written point instead of starting over
    after_seed: bool = False  # an every-iteration stage that also runs in iteration 0, on the seed adapter
    run: Callable[[Any, int], dict] | None = field(default=None, repr=False)  # (StageContext, t) -> metrics

    def runs(self, function: Callable[[Any, int], dict]) -> Callable[[Any, int], dict]:
        """Decorator: `function` runs this stage."""
        self.run = function
        return function


INIT = Stage("init", False, lambda ctx, t: [ctx.init_model], wanted=lambda config: config.init is not None, resumes_inside=True)
SEED = Stage(
    "seed",
    False,
    lambda ctx, t: [ctx.pairs(t), *ctx.held_out_pairs, ctx.adapter(t), *ctx.fitted_labeller],
    trains=True,
    resumes_inside=True,
)
GENERATE = Stage("generate", True, lambda ctx, t: [ctx.responses(t)], resumes_inside=True)
JUDGE = Stage("judge", True, lambda ctx, t: [ctx.judgments(t), ctx.pairs(t)])  # judge-spec scoring alone resumes
TRAIN = Stage("train", True, lambda ctx, t: [ctx.adapter(t)], trains=True, resumes_inside=True)
EVAL = Stage("eval", True, lambda ctx, t: [ctx.eval_report(t)], wanted=lambda config: config.eval is not None)
# last in its iteration: the stop rule reads the eval stage's score too
VALIDATE = Stage(
    "validate", True, lambda ctx, t: ctx.validation_files(t), wanted=lambda config: config.validation is not None, after_seed=True
)
STAGES = (INIT, SEED, GENERATE, JUDGE, TRAIN, EVAL, VALIDATE)  # in the order a run takes them
BY_NAME = {stage.name: stage for stage in STAGES}


def plan(config: RecipeConfig) -> list[tuple[int, str]]:
    """Every (iteration, stage name) of a run of `config`, in order."""
    wanted = [stage for stage in STAGES if stage.wanted(config)]
    once = [(0, stage.name) for stage in wanted if not stage.every_iteration or stage.after_seed]
    return once + [(t, stage.name) for t in range(1, config.num_iterations + 1) for stage in wanted if stage.every_iteration]


def adapter_stage(t: int) -> Stage:
    """The stage that writes iteration t's adapter."""
    return SEED if t == 0 else TRAIN
