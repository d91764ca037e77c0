"""Crash-safe file writes: write to a temporary name in the same folder, fsync, then rename.

Files get the usual mode for new files (0o666 less the process umask), not mkstemp's 0o600,
so other users and containers can read what qkv writes wherever the umask lets them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def file_mode() -> int:
    """The mode open() gives a new file: 0o666 less the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    If the body raises (a full disk, a kill signal turned into an exception), the temporary file
    is removed and whatever was at `path` before is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, file_mode())  # after the body: some writers replace the file
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


# How writer libraries that raise no OSError word a full disk: Rust's io::Error (tokenizers,
# safetensors) and numpy's short write ("115200 requested and 2016 written").
_DISK_FULL = re.compile(r"no space left|os error 28|\d+ requested and \d+ written", re.IGNORECASE)


@contextlib.contextmanager
def write_errors(path: str | os.PathLike,
                 kinds: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn a failed write of `path` into an OSError that names `path` (not a temporary file).

    Catches OSError and the writer library's own `kinds`. The new error keeps the errno it had;
    one whose text says the disk is full gets errno ENOSPC; any other keeps its text.
    """
    try:
        yield
    except (OSError, *kinds) as e:
        number = e.errno if isinstance(e, OSError) else None
        if number is None and _DISK_FULL.search(str(e)):
            number = errno.ENOSPC
        if number is None:
            raise OSError(f"cannot write {path}: {e}") from e
        raise OSError(number, os.strerror(number), str(path)) from e


def broken_symlink(folder: str | os.PathLike) -> str | None:
    """Why `folder` or a folder above it is a symlink that leads nowhere (dangling or looping),
    as a phrase naming it; None if none is."""
    folder = Path(folder)
    for path in (folder, *folder.parents):
        try:
            if not path.is_symlink() or path.exists():
                continue
            target = os.readlink(path)
        except OSError:
            continue
        try:
            path.stat()
        except OSError as e:
            if e.errno == errno.ELOOP:
                return f"{path} is a broken symlink (it loops back on itself)"
        return f"{path} is a broken symlink (it points to {target}, which does not exist)"
    return None


def probe_writable(folder: str | os.PathLike) -> None:
    """Create and remove a file in `folder`; the OSError if the folder takes no new file."""
    fd, probe = tempfile.mkstemp(prefix=".qkv-write-check.", suffix=".tmp", dir=folder)
    os.close(fd)
    os.unlink(probe)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside `folder` durable (best effort where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` and move the result onto `path` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append `line` plus a newline to a log file so that a reader never sees half of it.

    The line goes out in one write() on a file opened for appending. If the write is cut short
    (a full disk), the file is cut back to its old end and OSError is raised, so no torn line
    stays behind.
    """
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            written = os.write(fd, data)
        except OSError:
            os.ftruncate(fd, end)
            raise
        if written != len(data):
            os.ftruncate(fd, end)
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (wrote {written} of "
                          f"{len(data)} bytes)", str(path))
    finally:
        os.close(fd)
