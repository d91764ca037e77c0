"""Checks specific to the triton backend: block skipping, backward determinism, the split-KV
decode path and its merge, head-dim padding, native varlen, dropout bits and empty rows.

Without CUDA the kernels run under TRITON_INTERPRET=1 at small sizes; tests marked `gpu` run
the same kernels on a real device at larger sizes.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import qkv  # noqa: E402

from ._support import assert_matches, reference_run, run  # noqa: E402

registry = importlib.import_module("qkv.attention.registry")
tfunc = importlib.import_module("qkv.attention.triton.function")
tdecode = importlib.import_module("qkv.attention.triton.kernels_decode")

CPU_OK = "triton" in registry.backends("cpu")
needs_interp = pytest.mark.skipif(not CPU_OK, reason="triton backend not usable on the CPU")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DEV = "cpu"


def _inputs(B, Hq, Hk, Lq, Lk, D, Dv, dtype=torch.float32, device=DEV, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, Hk, Lk, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, Hk, Lk, Dv, generator=g).to(device=device, dtype=dtype)
    return q, k, v


def _run(backend, q, k, v, dtype, grad=True, lse_weight=0.0, **kw):
    """(out, lse, grads of q, k, v and a float bias) of a weighted sum of out and lse."""
    ins = [t.detach().to(dtype).requires_grad_(grad) for t in (q, k, v)]
    kw = {n: (x.detach().to(dtype).requires_grad_(x.requires_grad)
              if torch.is_tensor(x) and x.is_floating_point() else x) for n, x in kw.items()}
    torch.manual_seed(1234)  # the dropout seed
    out, lse = qkv.attention(*ins, backend=backend, return_lse=True, **kw)
    if not grad:
        return out, lse, []
    w = torch.cos(torch.arange(out.numel(), dtype=dtype, device=out.device)).view(out.shape)
    loss = (out * w).sum() + lse_weight * torch.where(torch.isfinite(lse), lse, 0.0).sum()
    extra = [kw["bias"]] if "bias" in kw and kw["bias"].requires_grad else []
    return out, lse, list(torch.autograd.grad(loss, ins + extra))


def _assert_close(got, want, atol, rtol=0.0):
    assert not torch.isnan(got).any()
    got, want = got.double(), want.double()
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf)
    err = (got - want)[~inf].abs().max().item() if (~inf).any() else 0.0
    assert err <= atol + rtol * want[~inf].abs().max().item() if (~inf).any() else True, err


def _compare(q, k, v, dtype=torch.float32, atol=2e-5, gatol=1e-4, grad=True, **kw):
    out, lse, grads = _run("triton", q, k, v, dtype, grad=grad, lse_weight=0.3, **kw)
    rout, rlse, rgrads = _run("reference", q, k, v, torch.float64, grad=grad, lse_weight=0.3,
                              **kw)
    _assert_close(out, rout, atol, atol)
    _assert_close(lse, rlse, atol, atol)
    for g, rg in zip(grads, rgrads, strict=True):
        _assert_close(g, rg, gatol, gatol)


# Every feature, alone and in the combinations whose block ranges interact. Lq != Lk and
# lengths that are not multiples of the 16-wide interpreter blocks exercise the boundaries.
FEATURES = {
    "plain": {},
    "causal": {"causal": True},
    "causal_lq_gt_lk": {"causal": True, "_shape": (40, 24)},
    "window": {"window": (7, 3)},
    "window_causal": {"window": (5, None), "causal": True},
    "kv_lengths_causal": {"kv_lengths": torch.tensor([0, 19]), "causal": True},
    "softcap_alibi": {"softcap": 2.0, "alibi_slopes": torch.tensor([0.3, 0.7])},
    "bias_broadcast_grad": {"bias": torch.randn(1, 2, 1, 40).requires_grad_()},
    "bias_full_grad": {"bias": torch.randn(2, 2, 24, 40).requires_grad_()},
    "mask": {"mask": torch.rand(2, 1, 24, 40) > 0.4},
    "dropout": {"dropout_p": 0.25, "causal": True},
}


@needs_interp
@pytest.mark.parametrize("name", list(FEATURES))
def test_feature_matches_reference(name):
    kw = dict(FEATURES[name])
    Lq, Lk = kw.pop("_shape", (24, 40))
    q, k, v = _inputs(2, 2, 1, Lq, Lk, 16, 24)  # grouped: two query heads share one K/V head
    _compare(q, k, v, **kw)


@needs_interp
def test_backward_is_deterministic():
    q, k, v = _inputs(1, 2, 1, 40, 40, 16, 16)
    first = _run("triton", q, k, v, torch.float32, causal=True)[2]
    second = _run("triton", q, k, v, torch.float32, causal=True)[2]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@needs_interp
def test_head_dims_are_padded():
    q, k, v = _inputs(1, 2, 1, 20, 24, 40, 20)  # D=40 -> 64 lanes, Dv=20 -> 32 lanes
    _compare(q, k, v, causal=True)


@needs_interp
def test_head_dim_256():
    q, k, v = _inputs(1, 1, 1, 16, 20, 256, 256)
    _compare(q, k, v, atol=5e-5, gatol=3e-4)


@needs_interp
def test_half_precision_inputs():
    q, k, v = _inputs(1, 2, 2, 20, 20, 16, 16)
    _compare(q, k, v, dtype=torch.float16, atol=4e-3, gatol=2e-2, causal=True)
    _compare(q, k, v, dtype=torch.bfloat16, atol=3e-2, gatol=8e-2, grad=False)


@needs_interp
def test_empty_rows_give_zeros_and_no_nan():
    q, k, v = _inputs(2, 2, 1, 8, 20, 16, 16)
    # Batch row 0 has no keys at all; with window (0, 0) past kv_length rows see nothing either.
    kw = {"kv_lengths": torch.tensor([0, 6]), "window": (0, 0)}
    out, lse, grads = _run("triton", q, k, v, torch.float32, **kw)
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))
    for g in grads:
        assert not torch.isnan(g).any()
    assert torch.all(grads[0][0] == 0)
    _compare(q, k, v, **kw)


@needs_interp
def test_zero_length_keys_and_queries():
    q, k, v = _inputs(1, 2, 1, 5, 0, 16, 16)
    out, lse, grads = _run("triton", q, k, v, torch.float32)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    assert all(torch.all(g == 0) for g in grads)
    q, k, v = _inputs(1, 2, 1, 0, 7, 16, 16)
    out, lse, grads = _run("triton", q, k, v, torch.float32)
    assert out.shape == (1, 2, 0, 16) and all(torch.all(g == 0) for g in grads)


@pytest.fixture
def decode_everywhere(monkeypatch):
    """Take the split-KV path for any cache length; record the number of splits."""
    splits = []
    real = tdecode.num_splits

    def spy(*args):
        splits.append(real(*args))
        return splits[-1]

    monkeypatch.setattr(tfunc, "DECODE_MIN_LK", 0)
    monkeypatch.setattr(tdecode, "num_splits", spy)
    return splits


@needs_interp
@pytest.mark.parametrize("kw", [
    {},
    {"causal": True, "kv_lengths": torch.tensor([0, 45])},
    {"window": (30, 0), "softcap": 3.0, "alibi_slopes": torch.rand(2, 4)},
], ids=["plain", "causal_kvlen_empty_row", "window_softcap_alibi"])
def test_decode_split_kv_matches_reference(decode_everywhere, kw):
    q, k, v = _inputs(2, 4, 1, 3, 80, 16, 24)
    _compare(q, k, v, **kw)
    assert decode_everywhere and decode_everywhere[0] > 1  # several splits were merged


@needs_interp
def test_decode_not_used_for_long_queries(decode_everywhere):
    q, k, v = _inputs(1, 2, 1, 20, 40, 16, 16)
    _run("triton", q, k, v, torch.float32, grad=False)
    assert decode_everywhere == []


@needs_interp
def test_varlen_is_native_and_matches_reference():
    assert registry.get("triton").forward_varlen is not None
    lq, lk = [5, 0, 19], [9, 4, 19]
    g = torch.Generator().manual_seed(3)
    q = torch.randn(sum(lq), 4, 16, generator=g)
    k = torch.randn(sum(lk), 2, 16, generator=g)
    v = torch.randn(sum(lk), 2, 8, generator=g)
    cu_q = torch.tensor([0, 5, 5, 24], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 13, 32], dtype=torch.int32)
    results = {}
    for name, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = qkv.attention_varlen(*ins, cu_q, cu_k, causal=True, window=(6, None),
                                        return_lse=True, backend=name)
        w = torch.sin(torch.arange(out.numel(), dtype=dtype)).view(out.shape)
        grads = torch.autograd.grad((out * w).sum(), ins)
        results[name] = (out, lse, *grads)
    for got, want in zip(results["triton"], results["reference"], strict=True):
        _assert_close(got, want, 1e-4, 1e-4)


def test_unsupported_features_are_named():
    q, k, v = _inputs(1, 1, 1, 4, 4, 8, 8, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="dtype"):
        qkv.attention(q, k, v, backend="triton")
    if CPU_OK:
        q, k, v = _inputs(1, 1, 1, 4, 4, 512, 8)
        with pytest.raises(NotImplementedError, match="head dim"):
            qkv.attention(q, k, v, backend="triton")


def test_auto_never_picks_triton_on_the_cpu():
    q, k, v = _inputs(1, 2, 2, 8, 8, 16, 16)
    call = importlib.import_module("qkv.attention.spec").check_call(q, k, v, softcap=1.0,
                                                                  return_lse=True)
    assert registry.choose(call, q, "auto").name != "triton"


# ---- on a real GPU ---------------------------------------------------------------------------

@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"window": (100, 0)},
                                {"bias": torch.randn(1, 8, 1, 300).requires_grad_()},
                                {"dropout_p": 0.1, "causal": True}],
                         ids=["plain", "causal", "window", "bias", "dropout"])
def test_gpu_matches_reference(dtype, kw):
    kw = {n: (x.cuda().detach().requires_grad_(x.requires_grad) if torch.is_tensor(x) else x)
          for n, x in kw.items()}
    q, k, v = _inputs(2, 8, 2, 257, 300, 128, 128, device="cuda")
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    _compare(q, k, v, dtype=dtype, atol=tol, gatol=tol * 8, **kw)


@gpu
@needs_cuda
def test_gpu_fp32_and_head_dims():
    for d, dv in ((64, 64), (96, 48), (256, 256)):
        q, k, v = _inputs(1, 4, 4, 200, 200, d, dv, device="cuda")
        _compare(q, k, v, atol=1e-4, gatol=1e-3, causal=True)


@gpu
@needs_cuda
def test_gpu_backward_is_deterministic():
    q, k, v = _inputs(2, 16, 4, 1024, 1024, 128, 128, dtype=torch.bfloat16, device="cuda")
    first = _run("triton", q, k, v, torch.bfloat16, causal=True)[2]
    second = _run("triton", q, k, v, torch.bfloat16, causal=True)[2]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@gpu
@needs_cuda
def test_gpu_decode_matches_reference(decode_everywhere):
    q, k, v = _inputs(4, 32, 8, 1, 8192, 128, 128, device="cuda")
    _compare(q, k, v, dtype=torch.bfloat16, atol=2e-2, gatol=2e-1, grad=False,
             kv_lengths=torch.tensor([8192, 100, 0, 5000], device="cuda"))
    assert decode_everywhere[0] > 1


@gpu
@needs_cuda
def test_gpu_auto_prefers_triton():
    assert registry.backends("cuda")[0] == "triton"


@needs_interp
@pytest.mark.parametrize("blocks", [(32, 16), (16, 32)])
@pytest.mark.parametrize("name", ["plain", "causal_lq_gt_lk", "window_causal",
                                  "kv_lengths_causal", "mask", "dropout"])
def test_unequal_block_shapes_match_reference(name, blocks, monkeypatch):
    """The GPU's autotuned configs use BLOCK_M != BLOCK_N; the block-range logic must hold."""
    monkeypatch.setattr(importlib.import_module("qkv.attention.triton.launch"),
                        "INTERPRET_BLOCKS", blocks)
    kw = dict(FEATURES[name])
    Lq, Lk = kw.pop("_shape", (24, 40))
    q, k, v = _inputs(2, 2, 1, Lq, Lk, 16, 24)
    _compare(q, k, v, **kw)


@needs_interp
@pytest.mark.parametrize("scale", [30.0, 300.0, 1e3, 1e4, -1e4])
def test_float32_gradients_hold_at_large_scores(scale):
    """Scores of |s| ~ 1e6 (q = k = v): the backward rebuilds p exactly as the forward had it."""
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    inputs, kw = (x, x, x), {"scale": scale}
    got = run("triton", inputs, kw, torch.float32, with_lse=True)
    ref = reference_run(inputs, kw, torch.float32, with_lse=True)
    assert_matches(got, ref, torch.float32, f"scale {scale}: ")
