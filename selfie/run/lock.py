"""The one-holder lock of a run directory, or of a command's own output (docs/RELIABILITY.md).

An flock where the filesystem has one; where it is refused (NFS without its lock daemon, Lustre without -o flock,
FUSE), an owner file created exclusively that names its holder, taken over once that holder is gone from this host.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from selfie.errors import SelfieError
from selfie.io import TMP_SUFFIX

logger = logging.getLogger(__name__)

# flock errors that mean "this filesystem has no working flock", not "someone holds it": NFS without its lock
# daemon (ENOLCK), Lustre mounted without -o flock (ENOSYS), FUSE and other filesystems (EOPNOTSUPP).
NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})
LOCKING_HELP = "use a local disk, NFS with its lock daemon, or Lustre mounted with -o flock"


class RunLock:
    """The one-holder lock of a run directory (or of any output): a second process is refused.

    Where the filesystem has flock: an flock on RUN/.lock holding the holder's pid; the kernel drops the lock of a
    killed holder, and the file goes when the holder releases it. Where flock is refused (NO_FLOCK): RUN/.lock.owner,
    created with O_CREAT | O_EXCL, holding the holder's pid, host and process start time; a file whose holder is gone
    from this host is taken over, one from another host is refused until someone removes it (docs/RELIABILITY.md).
    """

    def __init__(self, run_dir: Path, lock_file: Path | None = None, what: str = "run directory"):
        self.target, self.what = run_dir, what
        self.path = lock_file or run_dir / ".lock"
        self.owner_file = self.path.with_name(self.path.name + ".owner")
        self._fd: int | None = None
        self._owns_file = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._fd = self._flock()
        except OSError as e:
            if e.errno not in NO_FLOCK:
                raise
            logger.info("%s: the filesystem refuses flock (%s); locking with %s", self.path, e.strerror, self.owner_file)
            self._create_owner_file(e)
            return
        try:  # a holder whose mount refuses flock (another host's) holds the owner file instead
            if self.owner_file.exists():
                self._remove_if_stale()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self._owns_file:
            self.owner_file.unlink(missing_ok=True)
            self._owns_file = False
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still held, so nobody locks a file that is going away
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def _flock(self) -> int:
        """An fd of the lock file, flocked, holding this pid."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise SelfieError(f"{self.target}: {self.what} is in use by pid {holder}; wait for it or stop it") from None
            except OSError:
                os.close(fd)
                raise
            if self.path.exists() and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the holder released it and removed the file as we opened it: take a fresh one
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def _create_owner_file(self, flock_error: OSError) -> None:
        """Hold the lock as the creator of the owner file, taking over a stale one."""
        for _ in range(3):  # another process may take a stale file over in between
            try:
                fd = create_exclusive(self.owner_file)
            except FileExistsError:
                self._remove_if_stale()
                continue
            except OSError as e:
                raise SelfieError(
                    f"{self.path}: cannot lock the {self.what}: its filesystem refuses flock ({flock_error.strerror}) "
                    f"and exclusive file creation ({e.strerror}); put it on a filesystem with working locks "
                    f"({LOCKING_HELP})"
                ) from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(Holder.this_process().record())
                f.flush()
                os.fsync(f.fileno())
            self._owns_file = True
            return
        raise SelfieError(f"{self.target}: {self.what} is in use ({self.owner_file} keeps changing hands); try again")

    def _remove_if_stale(self) -> None:
        """Refuse while the owner file's holder may still run; remove the file of one that is gone. The file is
        renamed away before it is checked again, so of two processes taking it over only one removes it."""
        try:
            text = self.owner_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return  # released in between
        holder = Holder.parse(text)
        if holder is None or not holder.gone():
            raise self._in_use(holder)
        taken = self.owner_file.with_name(f"{self.owner_file.name}.{os.getpid()}{TMP_SUFFIX}")
        try:
            os.rename(self.owner_file, taken)
        except FileNotFoundError:
            return
        if taken.read_text(encoding="utf-8") != text:  # a live holder's, made in between: give it back
            os.rename(taken, self.owner_file)
            raise self._in_use(Holder.parse(self.owner_file.read_text(encoding="utf-8")))
        taken.unlink()
        logger.warning("%s: taking over the lock of pid %d, which is gone", self.target, holder.pid)

    def _in_use(self, holder: Holder | None) -> SelfieError:
        if holder is None:  # being written this instant, or cut by a kill between its creation and its write
            return SelfieError(
                f"{self.target}: {self.what} is in use ({self.owner_file} names no holder yet); if nothing runs on it, "
                "remove that file"
            )
        where = (
            "" if holder.host == socket.gethostname() else f" on {holder.host} (if nothing runs there, remove {self.owner_file})"
        )
        return SelfieError(f"{self.target}: {self.what} is in use by pid {holder.pid}{where}; wait for it or stop it")


def create_exclusive(path: Path) -> int:
    """A write fd of `path`, created now: FileExistsError when it is there (atomic on local disks and NFSv3+)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)


@dataclass(frozen=True)
class Holder:
    """Who holds an owner file: pid, host, and the process's start time, which tells it from a later process
    that reuses the pid (a restarted container numbers its processes alike)."""

    pid: int
    host: str
    start: str

    @classmethod
    def this_process(cls) -> Holder:
        return cls(os.getpid(), socket.gethostname(), process_start(os.getpid()) or "-")

    def record(self) -> str:
        return f"{self.pid} {self.host} {self.start}\n"

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        fields = text.split()
        if len(fields) != 3 or not fields[0].isdigit():
            return None
        return cls(int(fields[0]), fields[1], fields[2])

    def gone(self) -> bool:
        """Known to have ended: on this host, and its pid runs no process, or another one (a zombie is gone)."""
        if self.host != socket.gethostname():
            return False  # another host's processes cannot be seen from here
        start = process_start(self.pid)
        return start is None or self.start not in ("-", start)


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks after boot, /proc/PID/stat field 22); None when no process (or a
    zombie) has the pid. Without /proc: "-" for a process that runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self").is_dir():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "-"
    state, *fields = stat.rsplit(")", 1)[1].split()
    return None if state in ("Z", "X") else fields[18]


@contextlib.contextmanager
def output_lock(output: str | os.PathLike) -> Iterator[None]:
    """The run lock for a command's own output (`selfie generate | judge | eval`), through `.OUT.lock` beside it:
    a second command writing the same file or directory is refused."""
    output = Path(output)
    lock = RunLock(output, output.with_name(f".{output.name}.lock"), "output")
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
