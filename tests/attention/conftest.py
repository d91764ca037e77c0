"""Fixtures of the attention conformance suite.

Every backend that the registry reports usable on the CPU joins the whole matrix: adding a
backend with `qkv.attention.register(...)` needs no test edit. A slow backend declares smaller
sizes in `SIZE_CAPS` (in `_support.py`), and, listed in `SLOW_BACKENDS`, runs the full matrix
only under `-m slow` and the small smoke tests by default.

On a GPU machine, QKV_TEST_DEVICE=cuda runs test_matrix.py on CUDA tensors (`_support`). There
the triton kernels are compiled for the device, which dominates the run, so:
- each kernel runs the first config of its autotune list only (QKV_TEST_TRITON_CONFIGS=all
  tunes over the whole list; =first pins it in any run with CUDA, e.g. the `gpu` tests);
- the out-only variant of each matrix case moves to `-m slow`, as under the interpreter
  (`slow_here`);
- QKV_TEST_SHARD=i/n keeps the i-th of n shards, so n processes can compile in parallel.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from qkv.attention import chunked

from ._support import BACKENDS, DEVICE, SLOW_BACKENDS


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


def triton_configs(device: str | None = None) -> str:
    """"first" or "all": QKV_TEST_TRITON_CONFIGS, by default "first" on QKV_TEST_DEVICE=cuda.
    (Without CUDA the interpreter runs fixed blocks either way.)"""
    default = "first" if (device or DEVICE) == "cuda" else "all"
    mode = os.environ.get("QKV_TEST_TRITON_CONFIGS", default)
    if mode not in ("first", "all"):
        raise pytest.UsageError(f"QKV_TEST_TRITON_CONFIGS must be first or all, got {mode!r}")
    return mode


@pytest.fixture(scope="session", autouse=True)
def first_triton_config():
    """On CUDA test runs, each triton kernel runs the first config of its list (module
    docstring): one compile per specialization instead of one per config, and no timing."""
    if triton_configs() != "first" or not torch.cuda.is_available():
        yield
        return
    restore = pin_first_configs(importlib.import_module("qkv.attention.triton.launch"))
    yield
    restore()


def pin_first_configs(launch):
    """Make `launch.pairs` (the config list a kernel is tuned over) return its first config
    only, dropping the tuned wrappers built so far; returns the function that undoes it."""
    real = getattr(launch, "pairs", None)
    if real is None:  # launch.py no longer picks lists through `pairs`: tune over them all
        return lambda: None
    launch.pairs = lambda kind, prob: real(kind, prob)[:1]
    getattr(launch, "_TUNED", {}).clear()

    def restore():
        launch.pairs = real
        getattr(launch, "_TUNED", {}).clear()
    return restore


def shard_items(items: list, i: int, n: int) -> tuple[list, list]:
    """(kept, dropped) for shard i of n. Items of one matrix case form a group (they specialize
    the same kernels, so those compile in one process); groups, in collection order, go to the
    shards in turn."""
    groups: dict[str, int] = {}
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        key = str(params["case"]) if "case" in params else item.nodeid
        group = groups.setdefault(key, len(groups))
        (kept if group % n == i else dropped).append(item)
    return kept, dropped


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """"i/n" -> (i, n) with 0 <= i < n; None or "" -> None."""
    if not spec:
        return None
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise pytest.UsageError(f"QKV_TEST_SHARD must look like i/n, got {spec!r}") from None
    if not 0 <= i < n:
        raise pytest.UsageError(f"QKV_TEST_SHARD {spec!r}: need 0 <= i < n")
    return i, n


def slow_here(item) -> bool:
    """Whether a test item moves to `-m slow` (module docstring): the matrix's out-only variant
    of each case for triton, wherever it runs (compiled or in the interpreter). Its forward and
    its dK/dV kernel are the ones the lse variant runs too, and its dQ kernels differ only by
    not subtracting dlse from delta; out-only backward stays covered by the low-precision,
    large-logit, varlen and property tests."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return (params.get("backend") == "triton" and item.originalname == "test_matches_reference"
            and params.get("with_lse") is False)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Move items to `-m slow` (`slow_here`), before `-m` selects; on CUDA test runs, skip the
    tests outside test_matrix.py that take a backend (they build CPU tensors)."""
    for item in items:
        if slow_here(item):
            item.add_marker(pytest.mark.slow)
        uses_backend = {"backend", "any_backend"} & set(getattr(item, "fixturenames", ()))
        if DEVICE == "cuda" and uses_backend and item.path.name != "test_matrix.py":
            item.add_marker(pytest.mark.skip(reason="QKV_TEST_DEVICE=cuda runs test_matrix.py"))


class _Shard:
    """Keeps one shard (QKV_TEST_SHARD=i/n) of the items that `-m` and `-k` selected."""

    def __init__(self, i: int, n: int):
        self.i, self.n = i, n

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        kept, dropped = shard_items(items, self.i, self.n)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_configure(config):
    shard = parse_shard(os.environ.get("QKV_TEST_SHARD"))
    if shard is not None and not config.pluginmanager.has_plugin("qkv-test-shard"):
        config.pluginmanager.register(_Shard(*shard), "qkv-test-shard")
