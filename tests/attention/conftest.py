"""Fixtures of the attention conformance suite.

Every backend that the registry reports usable on the CPU joins the whole matrix: adding a
backend with `qkv.attention.register(...)` needs no test edit. A slow backend declares smaller
sizes in `SIZE_CAPS` (in `_support.py`); cases above the cap are skipped for it.
"""

from __future__ import annotations

import pytest

from qkv.attention import chunked

from ._support import BACKENDS


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Each backend usable on the CPU, by name."""
    return request.param


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Small chunked blocks, so the multi-block paths (and their edges) run at test sizes."""
    monkeypatch.setattr(chunked, "BLOCK_M", 16)
    monkeypatch.setattr(chunked, "BLOCK_N", 32)
