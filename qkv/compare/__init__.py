"""`qkv compare`: attention measured against recurrence and convolution, and three beliefs
about attention put to the test, in one reproducible report.

Each row is a module of this package defining `ROW`; `load_row(name)` imports it.
"""

from __future__ import annotations

import importlib

from qkv.compare.core import (
    Context,
    Row,
    RowResult,
    Settings,
    evaluate_task,
    fit,
    fmt,
    markdown_table,
)

# In the order they run and appear in the report.
ROW_NAMES = ("cost", "path", "recall", "code", "position", "explain", "scale")


def load_row(name: str) -> Row:
    """The Row called `name` (ValueError naming the known rows otherwise)."""
    if name not in ROW_NAMES:
        raise ValueError(f"unknown row {name!r}; choose from {list(ROW_NAMES)}")
    return importlib.import_module(f"qkv.compare.{name}").ROW


__all__ = ["ROW_NAMES", "Context", "Row", "RowResult", "Settings", "evaluate_task", "fit",
           "fmt", "load_row", "markdown_table"]
