"""Checks a command runs on its output paths before any work, so that a destination it cannot
write costs nothing and the message names the output, not a temporary file."""

from __future__ import annotations

import errno
from pathlib import Path

from qkv.io import broken_symlink, probe_writable


def is_dir(path: Path) -> bool:
    """Path.is_dir, but False (not OSError) for a name the system refuses, e.g. too long."""
    try:
        return path.is_dir()
    except OSError:
        return False


def check_writable_folder(folder: Path, output: Path | None = None) -> None:
    """Make `folder` if missing and try creating (and removing) a file in it; raise ValueError
    naming `output` (default: the folder) if either fails."""
    output = folder if output is None else output
    if (broken := broken_symlink(folder)) is not None:
        raise ValueError(f"cannot write {output}: {broken}")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cannot write {output}: {folder} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe_writable(folder)
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
