"""`selfie run` (scripts/launch/run_spa.py) with a count, after every stage, of the models that stage left alive.

    accelerate launch ... tests/stage_leaks.py RECIPE [--key value ...]

Writes OUTPUT_DIR/models_left.json (rank 0): one entry per stage run, {"stage": [t, name], "models": [class names of
the PreTrainedModels created during the stage and still reachable once it returned and memory was released]}.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

from transformers import PreTrainedModel

import selfie.run.stages  # noqa: F401 - attaches each stage's function to its entry in the plan
from selfie import memory
from selfie.cli.main import main
from selfie.config.loader import load_recipe
from selfie.dist import process_state
from selfie.run.plan import STAGES


def live_models() -> dict[int, str]:
    gc.collect()
    return {id(o): type(o).__name__ for o in gc.get_objects() if isinstance(o, PreTrainedModel)}


def counted(name, stage, log: list):
    def run(ctx, t):
        before = live_models()
        metrics = stage(ctx, t)
        memory.release()
        log.append({"stage": [t, name], "models": sorted(n for i, n in live_models().items() if i not in before)})
        return metrics

    return run


if __name__ == "__main__":
    log: list[dict] = []
    for stage in STAGES:
        stage.run = counted(stage.name, stage.run, log)
    code = main(["run", *sys.argv[1:]])
    if code == 0 and process_state().is_main_process:
        output_dir = Path(load_recipe(sys.argv[1], sys.argv[2:]).output_dir)
        (output_dir / "models_left.json").write_text(json.dumps(log))
    sys.exit(code)
