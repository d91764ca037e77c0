"""Checks a command runs on its output paths before any work, so that a destination it cannot
write costs nothing and the message names the output, not a temporary file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def check_writable_folder(folder: Path, output: Path | None = None) -> None:
    """Make `folder` if missing and try creating (and removing) a file in it; raise ValueError
    naming `output` (default: the folder) if either fails."""
    output = folder if output is None else output
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
    """check_writable_folder for a file's folder; a folder in the file's place is refused."""
    if path.is_dir():
        raise ValueError(f"{path} is a folder; name a file in it")
    check_writable_folder(path.parent, path)
