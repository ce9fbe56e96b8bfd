"""Running a recipe: the run directory, the stage plan and its driver, the checks before a run, status and tracking."""
