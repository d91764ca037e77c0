"""A run folder is used by one run at a time: checked up front, locked while in use, and not left
behind when a run fails before its first checkpoint (only by the process that made it, only
while holding its lock, and only if nothing but the run's own files is in it)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from qkv.io import broken_symlink, probe_writable
from qkv.train import distributed
from qkv.train.layout import RUN_CONFIG, TOKENIZER_FILE, checkpoints_dir
from qkv.train.metrics import METRICS_FILE

LOCK_FILE = ".lock"
# What a run writes in its folder before its first checkpoint; a folder holding anything else
# is never removed.
RUN_FILES = (RUN_CONFIG, TOKENIZER_FILE, METRICS_FILE, "checkpoints", LOCK_FILE)


class RunInUseError(OSError):
    """Another live process holds the run folder's lock."""


def check_writable(run_dir: str | os.PathLike) -> bool:
    """Create `run_dir` if needed and make sure files can be written in it; return whether THIS
    call made it (its own mkdir succeeded). Raises PermissionError / OSError naming the folder
    and what to do."""
    run_dir = Path(run_dir)
    created = False
    try:
        if (broken := broken_symlink(run_dir)) is not None:
            raise NotADirectoryError(errno.ENOTDIR, broken)
        if run_dir.exists() and not run_dir.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{run_dir} is a file, not a folder")
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(run_dir)
            created = True
        except FileExistsError:
            if not run_dir.is_dir():
                raise NotADirectoryError(errno.ENOTDIR,
                                         f"{run_dir} is a file, not a folder") from None
        probe_writable(run_dir)
    except OSError as e:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(run_dir)  # only if still empty
        kind = PermissionError if isinstance(e, PermissionError) else OSError
        remedy = "" if isinstance(e, NotADirectoryError) else ", or make it writable"
        error = kind(f"cannot write to the run folder {run_dir}: {e.strerror or e}; pick "
                     f"another out_dir{remedy}")
        error.errno = e.errno
        raise error from e
    return created


class RunLock:
    """An exclusive flock on RUN/.lock, holding the owner's PID for the message others get.

    The operating system drops the lock when its holder dies, so a lock left by a killed run
    is simply taken over.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self, *, wait_for_pid: float = 1.0) -> None:
        """Take the lock, or raise RunInUseError naming the PID of the run that holds it (read
        again for up to `wait_for_pid` seconds while the holder has not written it yet)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd, wait_for_pid)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunInUseError(f"run folder {self.path.parent} is in use by another qkv run "
                                f"(process {holder}); wait for it to finish or stop it, or pick "
                                f"another out_dir") from None
        if not _still_named(fd, self.path):  # its last holder removed it: lock the new one
            os.close(fd)
            return self.acquire(wait_for_pid=wait_for_pid)
        pid = f"{os.getpid()}\n".encode("ascii")
        os.pwrite(fd, pid, 0)  # written whole, then the rest of an older PID cut off
        os.ftruncate(fd, len(pid))
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None


def _still_named(fd: int, path: Path) -> bool:
    """Whether the open lock file is still the one at `path` (a failed run that made the folder
    deletes the file while it holds the lock)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _read_pid(fd: int, wait: float) -> str:
    """The PID in a lock file, waiting up to `wait` s for a holder that has just taken it."""
    deadline = time.monotonic() + wait
    while True:
        text = os.pread(fd, 64, 0).decode("ascii", "replace")
        first = text.split("\n")[0].strip() if "\n" in text else ""
        if first.isdigit() or time.monotonic() >= deadline:
            return first if first.isdigit() else "unknown"
        time.sleep(0.01)


def _remove_unused(run_dir: Path, extra: tuple[str, ...] = ()) -> bool:
    """Remove a run folder this process made, while holding its lock, if it holds no checkpoint
    and nothing but the run's own files (and `extra`); return whether it went."""
    allowed = set(RUN_FILES) | set(extra)
    try:
        names = set(os.listdir(run_dir))
        if names - allowed:
            return False
        checkpoints = checkpoints_dir(run_dir)
        if checkpoints.is_dir():
            os.rmdir(checkpoints)  # fails (and keeps everything) unless empty
        for name in names - {LOCK_FILE, checkpoints.name}:
            (run_dir / name).unlink()
        (run_dir / LOCK_FILE).unlink(missing_ok=True)  # still held: nobody else got in
        os.rmdir(run_dir)  # fails if another process has just put something in it
    except OSError:
        return False
    return True


def discard(run_dir: str | os.PathLike, extra: tuple[str, ...] = ()) -> bool:
    """Remove `run_dir`, which this process made, under its lock, unless a run holds it or it
    has a checkpoint or files not the run's own (`extra`: further names that may go too)."""
    lock = RunLock(run_dir)
    try:
        lock.acquire(wait_for_pid=0)
    except OSError:
        return False
    try:
        return _remove_unused(Path(run_dir), extra)
    finally:
        lock.release()


@contextlib.contextmanager
def claim(run_dir: str | os.PathLike, dist: distributed.DistInfo) -> Iterator[None]:
    """Hold `run_dir` for a run: check that it is writable and lock it (rank 0 does both; every
    rank raises rank 0's error, so none waits for the others). If the body raises and this
    process made the folder, it goes again unless a checkpoint or a foreign file is in it."""
    run_dir = Path(run_dir)
    lock, created, error = None, False, None
    if dist.is_main:
        try:
            created = check_writable(run_dir)
            lock = RunLock(run_dir)
            lock.acquire()
        except OSError as e:
            lock, error = None, e
            if created:
                with contextlib.suppress(OSError):
                    os.rmdir(run_dir)  # only if empty: another run's lock file keeps it
    error = distributed.broadcast_object(error, dist)
    try:
        if error is not None:
            raise error
        yield
    except BaseException:
        if lock is not None and created:
            _remove_unused(run_dir)
        raise
    finally:
        if lock is not None:
            lock.release()
