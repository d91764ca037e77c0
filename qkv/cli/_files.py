"""Checks a command runs on its output paths before any work, so that a destination it cannot
write costs nothing and the message names the output, not a temporary file."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


def is_dir(path: Path) -> bool:
    """Path.is_dir, but False (not OSError) for a name the system refuses, e.g. too long."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _broken_symlink(path: Path) -> str | None:
    """Why `path` is a symlink that leads nowhere (dangling or looping), else None."""
    try:
        if not path.is_symlink() or path.exists():
            return None
        target = os.readlink(path)
    except OSError:
        return None
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{path} is a broken symlink (it loops back on itself)"
    return f"{path} is a broken symlink (it points to {target}, which does not exist)"


def check_writable_folder(folder: Path, output: Path | None = None) -> None:
    """Make `folder` if missing and try creating (and removing) a file in it; raise ValueError
    naming `output` (default: the folder) if either fails."""
    output = folder if output is None else output
    for above in (folder, *folder.parents):
        if (broken := _broken_symlink(above)) is not None:
            raise ValueError(f"cannot write {output}: {broken}")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cannot write {output}: {folder} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".qkv-write-check.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"cannot write {output}: {folder} is not writable "
                         f"({e.strerror or e})") from None


def check_writable_file(path: Path) -> None:
    """check_writable_folder for a file's folder; a folder in the file's place, or a name the
    system refuses (too long), is refused."""
    try:
        path.lstat()
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise ValueError(f"cannot write {path}: the file name is too long; give a shorter "
                             "one") from None
    if is_dir(path):
        raise ValueError(f"{path} is a folder; name a file in it")
    check_writable_folder(path.parent, path)
