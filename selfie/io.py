"""Atomic file writes and JSON Lines I/O.

Every artifact is written to a temporary name in the same directory (`.<name>.<random>.tmp`, a file or a
directory) and renamed into place, so a reader (or a resumed run) never sees half a file; a killed writer's
temporary is removed when its run resumes (selfie/run/rundir.py::remove_leftovers). Long-running stages append
to `<name>.partial` and rename it when the stage completes; a torn last line from a killed process is
dropped on resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from selfie.errors import SelfieError

TMP_SUFFIX = ".tmp"  # temporaries are `.<name>.<random>.tmp`


def check_writable(path: str | os.PathLike, directory: bool) -> None:
    """Refuse, before any work, an output that cannot be written: a directory (or a file's directory) that is or
    would be made under a file, or whose nearest existing directory is read-only or refuses new entries (a
    directory is made there and removed: permissions alone do not tell, /proc grants root every one). Leaves
    nothing behind."""
    path = Path(path).absolute()
    if path.is_dir() != directory and path.exists():
        raise SelfieError(f"{path}: exists and is not a {'directory' if directory else 'file'}")
    probe = path if directory else path.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise SelfieError(f"{path}: cannot be created: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SelfieError(f"{path}: cannot be written: {probe} is read-only")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".selfie-probe-", dir=probe))
    except OSError as e:
        raise SelfieError(f"{path}: cannot be created in {probe} ({e.strerror})") from None


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(output: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory beside `output` to fill; renamed to `output` (replacing it) when the block succeeds,
    removed when it fails, so `output` is only ever absent, the old one, or complete."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=TMP_SUFFIX, dir=output.parent))
    try:
        yield tmp
        _default_modes(tmp)
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _default_modes(directory: Path) -> None:
    """The modes a plain mkdir / open would give: mkdtemp and mkstemp (used by some writers) make them private."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [directory, *directory.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file, without the byte-order mark some editors write first; one in another encoding is an error
    naming the file and the line (not a traceback)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SelfieError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); save it as UTF-8") from None


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise SelfieError(f"{path}: file not found")
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise SelfieError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Rows of a JSON Lines file; a malformed line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise SelfieError(f"{path}: file not found")
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SelfieError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise SelfieError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        yield row


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return list(iter_jsonl(path))


def count_lines(path: str | os.PathLike) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


class ResumableJsonl:
    """Append-only JSON Lines output that survives being killed.

    Rows go to `<path>.partial`, flushed and fsynced per `append`; `finish()` renames it to `path`.
    Opening an existing `.partial` keeps its complete rows (a torn trailing line is cut off), so the
    caller can skip the keys in `done_keys` and carry on without duplicates.
    """

    def __init__(self, path: str | os.PathLike, key: str = "prompt_id"):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done_keys: set[str] = set()
        if self.partial.exists():
            self._recover(key)
        self._file = open(self.partial, "a", encoding="utf-8")

    def _recover(self, key: str) -> None:
        data = self.partial.read_bytes()
        end = data.rfind(b"\n") + 1  # keep only complete lines
        if end < len(data):
            with open(self.partial, "r+b") as f:
                f.truncate(end)
        for line in data[:end].decode("utf-8").splitlines():
            if line.strip():
                self.done_keys.add(json.loads(line)[key])

    def append(self, rows: Iterable[dict]) -> None:
        self._file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        self._file.flush()
        os.fsync(self._file.fileno())

    def finish(self) -> None:
        self._file.close()
        os.replace(self.partial, self.path)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_yaml_mapping(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (a recipe, an init section); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise SelfieError(f"{path}: {what} file not found")
    try:
        values = yaml.safe_load(read_text(path)) or {}
    except yaml.YAMLError as e:
        raise SelfieError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise SelfieError(f"{path}: a {what} is a mapping of keys, got {type(values).__name__}")
    return values
