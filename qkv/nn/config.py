"""Loud validation helpers shared by the module configs."""

from __future__ import annotations

import dataclasses
from typing import Any


def check_choice(field: str, value: Any, choices: tuple) -> None:
    """Raise ValueError naming `field` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{field} must be one of {list(choices)}, got {value!r}")


def check_int(field: str, value: Any, *, minimum: int = 1, optional: bool = False) -> None:
    """Raise ValueError naming `field` unless `value` is an int >= minimum (or None if optional)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field} must be an int >= {minimum}, got {value!r}")


def check_float(field: str, value: Any, *, low: float, high: float | None = None,
                low_open: bool = False, high_open: bool = True, optional: bool = False) -> None:
    """Raise ValueError naming `field` unless low <= value (< or <=) high."""
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
    if not ok and high is None:
        raise ValueError(f"{field} must be a number {'>' if low_open else '>='} {low:g}, "
                         f"got {value!r}")
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"{field} must be a number in {left}{low:g}, {high:g}{right}, "
                         f"got {value!r}")


def check_unpadded(**arguments: Any) -> None:
    """Packed rows (cu_seqlens) take no padding and no cache: ValueError naming any given."""
    given = sorted(name for name, value in arguments.items() if value is not None)
    if given:
        raise ValueError(f"packed rows (cu_seqlens) have no padding and no cache; got {given}")


def from_dict(cls, values: dict):
    """Build the dataclass `cls` from a dict, raising ValueError on keys it does not have."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; known: {sorted(names)}")
    return cls(**values)
