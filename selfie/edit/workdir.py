"""Intermediate artefacts of an edit (self-generated data), reused when a build is run again.

Each set is a few JSON Lines files plus a settings file written last: the settings file marks the
set complete, and a set made with other settings is made again rather than silently reused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from selfie.io import atomic_write_json, atomic_write_jsonl, read_json, read_jsonl

logger = logging.getLogger(__name__)


def cached_rows(directory: Path, name: str, settings: dict, make: Callable[[], dict[str, list[dict]]]) -> dict[str, list[dict]]:
    """{file stem: rows} from `directory` if `name` was made there with `settings`, else `make()` (then saved)."""
    settings = json.loads(json.dumps(settings))  # the form it takes once read back (tuples -> lists)
    marker = directory / f"{name}_settings.json"
    if marker.is_file():
        saved = read_json(marker)
        if saved.get("settings") == settings and all((directory / f"{stem}.jsonl").is_file() for stem in saved["files"]):
            logger.info("reusing %s in %s", name, directory)
            return {stem: read_jsonl(directory / f"{stem}.jsonl") for stem in saved["files"]}
        logger.warning("%s: %s was made with other settings; making it again", directory, name)
    rows = make()
    for stem, items in rows.items():
        atomic_write_jsonl(directory / f"{stem}.jsonl", items)
    atomic_write_json(marker, {"settings": settings, "files": sorted(rows)})
    return rows
