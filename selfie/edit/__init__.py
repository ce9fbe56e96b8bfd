"""Representation editing: AlignEZ (directions, hooks, folding) and RAHF (LoRA toward edited states).

`build_edited_model` turns a recipe's `init:` mapping into a standalone model directory that the
loop uses as pi_init; `alignez_seed_pairs` gives AlignEZ's self-generated pairs as seed-DPO data
(reusing the init stage's, found in `work_dir_for(model_dir)`). The `selfie edit` verb is
selfie/cli/edit.py. See docs/EDITING.md.
"""

from selfie.edit.build import alignez_seed_pairs, build_edited_model, work_dir_for

__all__ = ["alignez_seed_pairs", "build_edited_model", "work_dir_for"]
