"""A run's metrics log, metrics.jsonl: one JSON object per line, each with a "kind" ("train",
"eval", "resume") and the "step" it belongs to.

Each record is appended with one write, so a reader never sees half of one. A line torn by a
crash (a full disk, a power cut) is dropped when the run resumes, together with the records of
steps after the checkpoint it resumes from, so the log always matches the state of the run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qkv.io import append_line, atomic_write_text

METRICS_FILE = "metrics.jsonl"


def _parse(line: str) -> dict[str, Any] | None:
    """The record on `line`, or None if the line is not one (torn, or not a JSON object)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return None
    return record


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The well-formed records of a metrics log, in order ([] if there is no log); torn or
    malformed lines are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", errors="replace") as f:
        return [r for line in f if line.strip() and (r := _parse(line)) is not None]


class MetricsLog:
    """metrics.jsonl of a run; only the process that owns the run folder (rank 0) writes."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled

    def append(self, record: dict[str, Any]) -> None:
        """Add one record (it must have a "step")."""
        if self.enabled:
            append_line(self.path, json.dumps(record))

    def reset(self) -> None:
        """Start an empty log (a run that starts from scratch)."""
        if self.enabled:
            self.path.unlink(missing_ok=True)

    def rewind(self, step: int) -> int:
        """Keep only well-formed records of steps up to `step`, the state a run resumes from;
        return how many lines were dropped. Raises OSError (e.g. a full disk) with a message
        saying the log is unchanged."""
        if not self.enabled or not self.path.is_file():
            return 0
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        kept = [line for line in lines if (r := _parse(line)) is not None and r["step"] <= step]
        dropped = sum(1 for line in lines if line.strip()) - len(kept)
        if dropped or (lines and not self.path.read_bytes().endswith(b"\n")):
            try:
                atomic_write_text(self.path, "".join(line + "\n" for line in kept))
            except OSError as e:
                error = OSError(f"could not rewrite {self.path} to match the checkpoint of step "
                                f"{step}: {e.strerror or e}; the log is unchanged; free some "
                                f"space (or fix the folder's permissions) and resume again")
                error.errno = e.errno
                raise error from e
        return dropped
