"""Representation editing: AlignEZ (directions, hooks, folding) and RAHF (LoRA toward edited states).

`build_edited_model` turns a recipe's `init:` mapping into a standalone model directory that the
loop uses as pi_init; `alignez_seed_pairs` gives AlignEZ's self-generated pairs as seed-DPO data
(reusing the init stage's, found in `work_dir_for(model_dir)`); `add_edit_args` / `run_edit_command`
are `selfie edit`. See docs/EDITING.md.
"""

from selfie.edit.build import add_edit_args, alignez_seed_pairs, build_edited_model, run_edit_command, work_dir_for

__all__ = ["add_edit_args", "alignez_seed_pairs", "build_edited_model", "run_edit_command", "work_dir_for"]
