"""Fixtures of the attention conformance suite.

Every backend that the registry reports usable on the CPU joins the whole matrix: adding a
backend with `qkv.attention.register(...)` needs no test edit. A slow backend declares smaller
sizes in `SIZE_CAPS` (in `_support.py`), and, listed in `SLOW_BACKENDS`, runs the full matrix
only under `-m slow` and the small smoke tests by default.
"""

from __future__ import annotations

import pytest

from qkv.attention import chunked

from ._support import BACKENDS, SLOW_BACKENDS


@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.slow) if name in SLOW_BACKENDS
                        else name for name in BACKENDS])
def backend(request) -> str:
    """Each backend usable on the CPU, by name (slow ones only under `-m slow`)."""
    return request.param


@pytest.fixture(params=BACKENDS)
def any_backend(request) -> str:
    """Each backend usable on the CPU, slow ones included: for small smoke tests."""
    return request.param


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Small chunked blocks, so the multi-block paths (and their edges) run at test sizes."""
    monkeypatch.setattr(chunked, "BLOCK_M", 16)
    monkeypatch.setattr(chunked, "BLOCK_N", 32)
