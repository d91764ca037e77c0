"""Where a run's checkpoints live and how they are checked: folder names, the manifest check,
the newest usable checkpoint, and putting right what a save cut short left behind.

RUN/checkpoints/step-00001000/ is a finished checkpoint. Hidden siblings are saves in progress
or cut short: `.step-N.tmp-PID` (being written), `.step-N.old-PID` (an unusable step-N moved
aside while its replacement takes the name), `.step-N.del-PID` (being pruned). qkv.train.checkpoint
writes and reads the files; this module never imports torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qkv.io import fsync_dir, sha256_file

FORMAT = 1
MODEL_FILE, MODEL_CONFIG, TOKENIZER_FILE = "model.safetensors", "model.json", "tokenizer.json"
OPTIMIZER_FILE, STATE_FILE, MANIFEST = "optimizer.safetensors", "trainer.json", "manifest.json"
RUN_CONFIG = "config.json"  # a run folder's settings, beside its tokenizer.json and checkpoints/
STEP_DIR = re.compile(r"^step-(\d{8,})$")
_LEFTOVER = re.compile(r"^\.(step-\d{8,})\.(tmp|old|del)-[0-9-]+$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, truncated, or for another model."""


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    """RUN/checkpoints."""
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """RUN/checkpoints/step-NNNNNNNN, the folder of checkpoint `step`."""
    return checkpoints_dir(run_dir) / f"step-{step:08d}"


# ---------------------------------------------------------------- replacing and recovering


def fresh_name(final: Path, kind: str) -> Path:
    """A hidden sibling `.step-N.<kind>-<pid>[-k]` of `final` that does not exist yet."""
    base = final.parent / f".{final.name}.{kind}-{os.getpid()}"
    path, k = base, 0
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def install(new: Path, final: Path) -> None:
    """Give the complete checkpoint folder `new` the name `final`.

    An unusable folder already at `final` is moved aside before and deleted after, so a crash in
    between leaves both, and `recover` puts the complete one back.
    """
    fsync_dir(new)
    old = None
    if final.exists():
        old = fresh_name(final, "old")
        os.replace(final, old)
    os.replace(new, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # what stays is cleared by the next `recover`


def usable(path: Path) -> bool:
    """Whether `path` is a checkpoint folder that passes `verify`."""
    try:
        verify(path)
    except (CheckpointError, OSError):
        return False
    return True


def recover(run_dir: str | os.PathLike) -> list[str]:
    """Finish or undo saves that were cut short; return a note per checkpoint put back.

    A hidden `.step-N.tmp-*` / `.step-N.old-*` folder that passes `verify` becomes step-N when
    step-N is missing or fails its checks (the newer copy first); every other leftover (an
    incomplete copy, a folder being pruned) is deleted. Call it while holding the run's lock.
    """
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    order = {"tmp": 0, "old": 1, "del": 2}  # the newer copy first; pruned ones never
    leftovers = sorted((m.group(1), order[m.group(2)], p.name) for p in folder.iterdir()
                       if (m := _LEFTOVER.match(p.name)))
    notes = []
    for name, kind, leftover in leftovers:
        path, final = folder / leftover, folder / name
        if kind < 2 and path.is_dir() and not usable(final) and usable(path):
            install(path, final)
            notes.append(f"recovered {final} from a save that was cut short")
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return notes


def prune(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints of a run (best effort: what a failure
    leaves behind goes at the next `recover`)."""
    for path in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        doomed = fresh_name(path, "del")  # a kill mid-delete leaves no half step-N behind
        try:
            os.replace(path, doomed)
        except OSError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------- finding and verifying


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The finished checkpoint folders of a run, oldest first."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of checkpoint folder `path` after checking every file's size and SHA-256.

    Raises CheckpointError naming the folder, the file and what is wrong.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupt ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {manifest.get('format')!r}; this "
                              f"version of qkv reads format {FORMAT}")
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint {path}: {name} is {size} bytes, the manifest "
                                  f"says {info['bytes']} (truncated or overwritten)")
        if sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} fails its SHA-256 check (corrupt)")
    return manifest


def find_latest(run_dir: str | os.PathLike,
                warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint of a run that passes `verify`, or None if the run has none.

    Each newer checkpoint that fails is reported through `warn` along with the one used instead.
    Raises CheckpointError if checkpoints exist but none is usable.
    """
    problems = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify(path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems and warn is not None:
            for problem in problems:
                warn(f"{problem}; falling back to {path.name}")
        return path
    if problems:
        raise CheckpointError("no usable checkpoint in " + str(checkpoints_dir(run_dir)) + ":\n  "
                              + "\n  ".join(problems))
    return None


def resolve(path: str | os.PathLike, warn: Callable[[str], None] | None = None) -> Path:
    """A verified checkpoint folder from `path`: a checkpoint folder, or a run folder (its
    newest usable checkpoint). Raises FileNotFoundError or CheckpointError."""
    path = Path(path)
    if (path / MANIFEST).exists() or STEP_DIR.match(path.name):
        verify(path)
        return path
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    latest = find_latest(path, warn)
    if latest is None:
        raise FileNotFoundError(f"{path} holds no checkpoint (expected a step-* folder or a run "
                                f"folder with checkpoints/)")
    return latest
