"""One run per output directory: an OS file lock (``flock``) on ``OUTPUT/.compress.lock``, held for
the whole run by the process that writes the directory (rank 0 under torchrun).

The kernel drops the lock when its holder dies (SIGKILL, OOM, a crash), so a lock file left by a dead
run is simply taken over. The file records who holds it (pid, host, start time, command) for the
refusal a second run gets. It is never replaced while held (``--force`` deletes everything in the
directory but the lock file), and a process that locked a file which was meanwhile unlinked by its
releasing holder notices (the path no longer names the inode it locked) and tries again: two
processes can never both believe they hold the directory.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from compress_cli.errors import UsageError

LOCK_NAME = ".compress.lock"


class OutputLock:
    """The held lock of one output directory; :meth:`release` (or process death) lets it go."""

    def __init__(self, out: Path, fd: int | None, created: list[Path]):
        self.out = out
        self.path = out / LOCK_NAME
        self.fd = fd  # None: the file system cannot lock; the run goes on unguarded
        self.created = created  # the folders acquire made, deepest first

    def release(self) -> None:
        """Unlink the lock file while still holding it, then let it go; remove the output directory
        (and the parents made for it) when this run created it and left nothing in it (a run refused
        before writing anything)."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self.fd)
            self.fd = None
        for d in self.created:
            try:
                d.rmdir()  # only when empty
            except OSError:
                break
        self.created = []


def holder(path: Path) -> str:
    """Who holds the lock file at ``path``, in words (``pid 12 on host-a, started 2026-...``)."""
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):  # being written this instant, or not ours
        return "another process"


def acquire(out: Path, on_message: Callable[[str], None] | None = None) -> OutputLock:
    """Create ``out`` if needed and lock it for this process, or raise a UsageError (exit 2) naming
    the live run that holds it. Never blocks."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out}: exists and is not a directory")
    created = [p for p in [out, *out.parents] if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"output {out}: not writable ({e.strerror or e})") from None
    lock = OutputLock(out, None, created)
    if sys.platform == "win32":  # no flock; nothing stops a second run there
        return lock
    import fcntl

    path = lock.path
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            lock.release()
            raise UsageError(f"output {out}: not writable ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(
                f"output {out}: in use by another run ({holder(path)}); "
                "wait for it to finish, or write elsewhere with --output DIR"
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            if on_message is not None:
                on_message(f"output {out}: this file system cannot lock files; nothing stops a second run")
            return lock
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder unlinked it as it finished: lock the file that is there now
    lock.fd = fd
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)  # in place: replacing the file would hand a second run a fresh, unlocked one
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return lock


@contextlib.contextmanager
def output_lock(out: Path, on_message: Callable[[str], None] | None = None) -> Iterator[OutputLock]:
    """:func:`acquire` for the duration of the block."""
    lock = acquire(out, on_message)
    try:
        yield lock
    finally:
        lock.release()
