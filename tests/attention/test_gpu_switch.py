"""The conformance suite's device switch (QKV_TEST_DEVICE), its shards and its CUDA-only rules,
checked on the CPU: with no request nothing changes; a "cuda" request selects what the GPU run
should run."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from . import _support, conftest
from ._support import Case, cast, make_inputs, select_backends

registry = importlib.import_module("qkv.attention.registry")
CUDA_LIST = ["triton", "sdpa", "chunked", "reference"]


REQUESTED = os.environ.get("QKV_TEST_DEVICE") or os.environ.get("QKV_TEST_BACKENDS")


@pytest.mark.skipif(bool(REQUESTED), reason="a device or backends were requested")
def test_without_a_request_the_matrix_runs_every_cpu_backend_on_the_cpu():
    assert _support.DEVICE == "cpu"
    assert registry.backends("cpu") == _support.BACKENDS
    assert select_backends("cpu", ["sdpa", "chunked", "reference"]) == [
        "sdpa", "chunked", "reference"]
    assert conftest.triton_configs("cpu") == "all"


def test_a_cuda_request_runs_the_cuda_backends_against_the_cpu_reference():
    assert select_backends("cuda", CUDA_LIST) == ["triton", "sdpa", "chunked"]
    assert select_backends("cuda", CUDA_LIST, "triton, sdpa") == ["triton", "sdpa"]
    assert select_backends("cpu", ["sdpa", "chunked", "reference"], "chunked") == ["chunked"]
    with pytest.raises(ValueError, match="'reference'"):
        select_backends("cuda", CUDA_LIST, "reference")
    with pytest.raises(ValueError, match="QKV_TEST_DEVICE must be 'cpu' or 'cuda', got 'tpu'"):
        select_backends("tpu", CUDA_LIST)


def test_dtypes_per_device():
    assert _support.best_dtype("sdpa", "cuda") == torch.float64
    assert _support.best_dtype("reference", "cpu") == torch.float64
    if "triton" in registry._REGISTRY:
        assert _support.best_dtype("triton", "cpu") == torch.float32
        assert _support.best_dtype("triton", "cuda") == torch.float16


def test_cast_moves_inputs_and_keyword_tensors_to_the_device():
    case = Case("switch_cast", mask="keys", bias="rows", alibi="h", kv_lengths=(45, 20),
                kw={"causal": True})
    inputs, kw = make_inputs(case)
    (q, k, v), moved = cast(inputs, kw, torch.float16, grad_bias=True, device="meta")
    assert all(t.device.type == "meta" and t.dtype == torch.float16 and t.requires_grad
               for t in (q, k, v))
    for name in ("mask", "bias", "alibi_slopes", "kv_lengths"):
        assert moved[name].device.type == "meta", name
    assert moved["bias"].requires_grad and moved["causal"] is True
    assert moved["alibi_slopes"].dtype == torch.float32  # keyword dtypes are kept
    (q, _, _), same = cast(inputs, kw, torch.float32, grad_bias=False, device="cpu")
    assert q.device.type == "cpu" and same["mask"] is kw["mask"]


def _item(name, nodeid=None, **params):
    return SimpleNamespace(originalname=name, nodeid=nodeid or f"{name}{params}",
                           callspec=SimpleNamespace(params=params))


def test_slow_rule_is_the_same_on_both_devices():
    out_only = _item("test_matches_reference", backend="triton", with_lse=False)
    with_lse = _item("test_matches_reference", backend="triton", with_lse=True)
    sdpa = _item("test_matches_reference", backend="sdpa", with_lse=False)
    f32 = _item("test_low_precision_matches_reference", backend="triton", dtype=torch.float32)
    assert conftest.slow_here(out_only)
    assert not any(conftest.slow_here(i) for i in (with_lse, sdpa, f32))


def test_shards_keep_a_case_together_and_cover_every_item_once():
    items = [_item("test_matches_reference", f"m[{b}-{c}-{w}]", backend=b, case=c, with_lse=w)
             for c in ("plain", "causal", "gqa", "decode", "d256")
             for b in ("triton", "sdpa") for w in (False, True)]
    items += [_item("test_gpu_fp32", f"g[{d}]", d=d) for d in (64, 96, 256)]
    shards = [conftest.shard_items(items, i, 3) for i in range(3)]
    kept = [item.nodeid for k, _ in shards for item in k]
    assert sorted(kept) == sorted(item.nodeid for item in items)
    for k, dropped in shards:
        assert len(k) + len(dropped) == len(items)
        cases = {item.callspec.params.get("case") for item in k} - {None}
        for item in items:
            if item.callspec.params.get("case") in cases:
                assert item in k
    # three consecutive single items (the fp32 gpu tests) land in three different shards
    homes = [i for i, (k, _) in enumerate(shards) for item in k
             if item.originalname == "test_gpu_fp32"]
    assert sorted(homes) == [0, 1, 2]


def test_shard_and_config_settings_are_checked(monkeypatch):
    assert conftest.parse_shard(None) is None and conftest.parse_shard("2/5") == (2, 5)
    for bad in ("2", "a/b", "3/3", "-1/2"):
        with pytest.raises(pytest.UsageError, match="QKV_TEST_SHARD"):
            conftest.parse_shard(bad)
    monkeypatch.delenv("QKV_TEST_TRITON_CONFIGS", raising=False)
    assert conftest.triton_configs("cuda") == "first"
    monkeypatch.setenv("QKV_TEST_TRITON_CONFIGS", "all")
    assert conftest.triton_configs("cuda") == "all"
    monkeypatch.setenv("QKV_TEST_TRITON_CONFIGS", "some")
    with pytest.raises(pytest.UsageError, match="first or all"):
        conftest.triton_configs("cpu")


def test_pinning_keeps_the_first_config_of_each_list_and_restores_the_lists():
    launch = pytest.importorskip("qkv.attention.triton.launch")
    prob = SimpleNamespace(shape={"PREC": "tf32"}, block_d=128, block_dv=128)
    full = launch.pairs("fwd", prob)
    restore = conftest.pin_first_configs(launch)
    try:
        assert launch.pairs("fwd", prob) == full[:1] and launch._TUNED == {}
    finally:
        restore()
    assert launch.pairs("fwd", prob) == full


@pytest.mark.slow
def test_collection_with_shards_on_the_cpu():
    """Two shards of the matrix's collection split it with nothing lost (about 20 s)."""
    root = Path(__file__).resolve().parents[2]
    names = []
    for shard in ("", "0/2", "1/2"):
        env = {**os.environ, "QKV_TEST_SHARD": shard, "PYTHONPATH": str(root)}
        env.pop("QKV_TEST_DEVICE", None)
        res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                              "-p", "no:cacheprovider", "tests/attention/test_matrix.py"],
                             cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        names.append({ln for ln in res.stdout.splitlines() if "::" in ln})
    whole, first, second = names
    assert first and second and not first & second and first | second == whole
