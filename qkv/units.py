"""Sizes in bytes, read from and written for people: "24GiB" in, "25.8 GB" out."""

from __future__ import annotations

import math
import re

_UNITS = {"": 1, "b": 1,
          "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "p": 1000**5, "pb": 1000**5,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "pib": 1 << 50}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_bytes(text: str, name: str = "size") -> int:
    """Bytes in a size such as 8GiB, 512 MiB, 2GB, 1.5G or 1000000 (GB, G: 10^9; GiB: 2^30).

    ValueError naming `name` and the accepted forms for anything else, for sizes below one
    byte, and for sizes too large to be finite (1e400GiB).
    """
    match = _SIZE.fullmatch(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{name} must be a size such as 8GiB, 512MiB, 2GB or 1.5G, "
                         f"got {text!r}")
    value = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite size, got {text!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least one byte, got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    """A byte count in decimal units with three significant digits: 512 bytes, 12.3 MB, 1.50 GB."""
    if n < 1000:
        return f"{n:,.0f} bytes"
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        n /= 1000
        if n < 999.5 or unit == "PB":
            return f"{n:.3g} {unit}" if n < 999.5 else f"{n:,.0f} {unit}"
    raise AssertionError


def exact_size(n: int) -> str:
    """A byte count as parse_bytes reads it back exactly: the largest unit that divides it, else
    plain bytes ("8GiB", "2GB", "512MiB", "1234")."""
    for unit, scale in (("TiB", 1 << 40), ("TB", 1000**4), ("GiB", 1 << 30), ("GB", 1000**3),
                        ("MiB", 1 << 20), ("MB", 1000**2), ("KiB", 1 << 10), ("kB", 1000)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def readable_size(n: int) -> str:
    """exact_size where it has a unit ("8GiB"), else a count of bytes ("1 byte", "1,234 bytes")."""
    exact = exact_size(n)
    if not exact.isdigit():
        return exact
    return "1 byte" if n == 1 else f"{n:,} bytes"
