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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under Triton's interpreter (no GPU), the matrix's out-only variant of each case moves to
    `-m slow`: its forward and its dK/dV and dQ kernels are the ones the lse variant runs too,
    which differs only by subtracting dlse from delta. Out-only backward stays covered by the
    low-precision, large-logit, varlen and property tests."""
    import torch

    if torch.cuda.is_available():
        return
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if (item.originalname == "test_matches_reference" and params.get("backend") == "triton"
                and params.get("with_lse") is False):
            item.add_marker(pytest.mark.slow)
