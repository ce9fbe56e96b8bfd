"""The one exception type users see: a single line naming the file, row or key at fault."""

from __future__ import annotations

import errno
import os


class SelfieError(Exception):
    """Bad user input. The CLI prints `selfie: error: <message>` and exits with status 2."""


def os_error_line(error: OSError) -> str:
    """An OSError (a read-only or full disk, a path under a file) as one line: the path and the reason."""
    return f"{error.filename + ': ' if error.filename else ''}{error.strerror or error}"


def out_of_space(error: BaseException, path: str | os.PathLike) -> bool:
    """Whether `error` comes from a full disk: ENOSPC in its chain, or any error while the disk holding `path` has
    under 64 MiB left (torch.save reports a failed write as a RuntimeError with no errno)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cause = cause.__cause__ or cause.__context__
    try:
        stats = os.statvfs(path)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < 64 * 2**20
