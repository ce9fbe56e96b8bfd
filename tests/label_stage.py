"""Score responses with a judge spec as the loop's judge stage does (selfie/run/labellers.py, a judge spec's `judge`): what the
cluster tests launch, alone or under `accelerate launch`.

    accelerate launch --config_file accelerate_configs/multi_gpu.yaml tests/label_stage.py \
        MODEL RESPONSES.jsonl RUN_DIR SPEC

Writes RUN_DIR/iter_001/judgments.jsonl (resuming from its `.partial` files); rank 0 prints the stage metrics as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from selfie.config.loader import load_recipe
from selfie.dist import Ranks, process_state
from selfie.errors import SelfieError
from selfie.io import read_jsonl
from selfie.run.context import StageContext
from selfie.run.labellers import labeller_for


def main(model: str, responses: str, run_dir: str, spec: str) -> None:
    config = load_recipe(None, {"model": {"name": model}, "judge": {"labeller": spec}, "output_dir": run_dir})
    ranks = Ranks(process_state())
    metrics = labeller_for(spec).judge(StageContext(config, Path(run_dir), ranks), 1, read_jsonl(responses))
    if ranks.is_main:
        print(json.dumps(metrics), flush=True)


if __name__ == "__main__":
    try:
        main(*sys.argv[1:])
    except SelfieError as e:
        print(f"selfie: error: {e}", file=sys.stderr)
        sys.exit(2)
