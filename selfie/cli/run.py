"""`selfie run RECIPE [--key value ...]`: run or resume a recipe, or (--dry-run) check it and print its plan."""

from __future__ import annotations

import argparse

from selfie.config.loader import load_recipe

OVERRIDES = """\
Any recipe key can follow the recipe as --section.key value, its value read as YAML:
  selfie run RECIPE --train.beta 0.2 --data.iteration_sizes '[100, 100]' --output_dir runs/mine
  selfie run RECIPE --eval '{judge: reward-model:PATH, num_prompts: 64}'
A bad key or value is one line naming it. Every key with its default: docs/RECIPES.md. Run the same command again
to resume; --dry-run first to see the plan and what it will cost."""


def add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.description = "Run or resume a recipe: the seed stage, then generate, judge and train per iteration."
    parser.epilog = OVERRIDES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("recipe", help="a recipe YAML file (recipes/ holds the shipped ones)")
    parser.add_argument("--force", action="store_true", help="continue a run whose config.yaml differs")
    parser.add_argument("--dry-run", action="store_true", help="check everything and print the plan; write nothing")


def run_recipe_command(args: argparse.Namespace, overrides: list[str]) -> None:
    # The run layer is imported when the verb runs, not with the parser: it loads the trainer, the generators and
    # matplotlib, which `selfie --help` and `selfie status` do not need.
    from selfie.dist import launched_rank
    from selfie.run.loop import run_loop
    from selfie.run.preflight import dry_run

    config = load_recipe(args.recipe, overrides)
    if args.dry_run:
        plan = dry_run(config, args.force)  # every rank checks what it will read
        if launched_rank() == 0:
            print(plan)
        return
    table = run_loop(config, force=args.force)
    if table:
        print(table)
