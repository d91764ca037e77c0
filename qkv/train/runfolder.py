"""A run folder is used by one run at a time: checked up front, locked while in use, and not left
behind empty when a run fails before its first checkpoint."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qkv.train import distributed

LOCK_FILE = ".lock"


class RunInUseError(OSError):
    """Another live process holds the run folder's lock."""


def check_writable(run_dir: str | os.PathLike) -> bool:
    """Create `run_dir` if needed and make sure files can be written in it; return whether it
    was created. Raises PermissionError / OSError naming the folder and what to do."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _probe(run_dir)
    except OSError as e:
        if created and run_dir.is_dir():
            shutil.rmtree(run_dir, ignore_errors=True)
        kind = PermissionError if isinstance(e, PermissionError) else OSError
        error = kind(f"cannot write to the run folder {run_dir}: {e.strerror or e}; pick another "
                     f"out_dir, or make it writable")
        error.errno = e.errno
        raise error from e
    return created


def _probe(folder: Path) -> None:
    with tempfile.TemporaryFile(dir=folder):
        pass


class RunLock:
    """An exclusive flock on RUN/.lock, holding the owner's PID for the message others get.

    The operating system drops the lock when its holder dies, so a lock left by a killed run
    is simply taken over.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise RunInUseError naming the PID of the run that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunInUseError(f"run folder {self.path.parent} is in use by another qkv run "
                                f"(process {holder}); wait for it to finish or stop it, or pick "
                                f"another out_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None


@contextlib.contextmanager
def claim(run_dir: str | os.PathLike, dist: distributed.DistInfo) -> Iterator[None]:
    """Hold `run_dir` for a run: check that it is writable and lock it (rank 0 does both; every
    rank raises rank 0's error, so none waits for the others). If the body raises and the folder
    did not exist before, the folder goes again unless a checkpoint was written in it."""
    from qkv.train.checkpoint import list_checkpoints

    run_dir = Path(run_dir)
    lock, created, error = None, False, None
    if dist.is_main:
        try:
            created = check_writable(run_dir)
            lock = RunLock(run_dir)
            lock.acquire()
        except OSError as e:
            lock, error = None, e
    error = distributed.broadcast_object(error, dist)
    try:
        if error is not None:
            raise error
        yield
    except BaseException:
        if dist.is_main and created and not list_checkpoints(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            lock.release()
