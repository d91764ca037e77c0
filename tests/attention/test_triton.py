"""Checks specific to the triton backend: block skipping, backward determinism, the split-KV
decode path and its merge, head-dim padding, native varlen, dropout bits, empty rows and float32
gradients at large scores.

Without CUDA the kernels run under TRITON_INTERPRET=1 (set in tests/conftest.py) at small sizes;
tests marked `gpu` run the same kernels on a real device at larger sizes.
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")

import qkv  # noqa: E402

from ._support import (  # noqa: E402
    GRAD_TOL,
    TOL,
    Case,
    assert_close,
    assert_matches,
    cast,
    make_inputs,
    reference_run,
    run,
)

registry = importlib.import_module("qkv.attention.registry")
tfunc = importlib.import_module("qkv.attention.triton.function")
tdecode = importlib.import_module("qkv.attention.triton.kernels_decode")

CPU_OK = "triton" in registry.backends("cpu")
needs_interp = pytest.mark.skipif(not CPU_OK, reason="triton backend not usable on the CPU")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _inputs(name, B, Hq, Hk, Lq, Lk, D, Dv):
    """float64 q, k, v of the given shapes (the conformance suite's inputs for a named case)."""
    return make_inputs(Case(name, B=B, Hq=Hq, Hk=Hk, Lq=Lq, Lk=Lk, D=D, Dv=Dv))[0]


def _compare(inputs, kw=None, dtype=torch.float32):
    """Triton against the float64 reference on the same rounded inputs: out, lse and every
    gradient, within the conformance suite's tolerances for `dtype`."""
    got = run("triton", inputs, kw or {}, dtype, with_lse=True)
    assert_matches(got, reference_run(inputs, kw or {}, dtype, with_lse=True), dtype)


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


def _feature_case(name):
    kw = dict(FEATURES[name])
    Lq, Lk = kw.pop("_shape", (24, 40))
    # grouped: two query heads share one K/V head
    return _inputs(f"triton-{name}", 2, 2, 1, Lq, Lk, 16, 24), kw


@needs_interp
@pytest.mark.parametrize("name", list(FEATURES))
def test_feature_matches_reference(name):
    _compare(*_feature_case(name))


@needs_interp
def test_backward_is_deterministic():
    inputs = _inputs("triton-determinism", 1, 2, 1, 40, 40, 16, 16)
    first = run("triton", inputs, {"causal": True}, torch.float32, with_lse=True)
    second = run("triton", inputs, {"causal": True}, torch.float32, with_lse=True)
    for key in ("dq", "dk", "dv"):
        assert torch.equal(first[key], second[key]), key


@needs_interp
def test_head_dims_are_padded():
    # D=40 -> 64 lanes, Dv=20 -> 32 lanes
    _compare(_inputs("triton-padded-dims", 1, 2, 1, 20, 24, 40, 20), {"causal": True})


@needs_interp
def test_head_dim_256():
    _compare(_inputs("triton-dim-256", 1, 1, 1, 16, 20, 256, 256))


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    _compare(_inputs("triton-half", 1, 2, 2, 20, 20, 16, 16), {"causal": True}, dtype)


@needs_interp
def test_empty_rows_give_zeros_and_no_nan():
    inputs = _inputs("triton-empty-rows", 2, 2, 1, 8, 20, 16, 16)
    # Batch row 0 has no keys at all; with window (0, 0) past kv_length rows see nothing either.
    kw = {"kv_lengths": torch.tensor([0, 6]), "window": (0, 0)}
    got = run("triton", inputs, kw, torch.float32, with_lse=True)
    assert torch.all(got["out"][0] == 0) and torch.all(torch.isneginf(got["lse"][0]))
    assert torch.all(got["dq"][0] == 0)
    _compare(inputs, kw)  # no NaN anywhere, gradients included


@needs_interp
@pytest.mark.parametrize("Lq, Lk", [(5, 0), (0, 7)])
def test_zero_length_keys_and_queries(Lq, Lk):
    got = run("triton", _inputs("triton-zero-length", 1, 2, 1, Lq, Lk, 16, 16), {},
              torch.float32, with_lse=True)
    assert torch.all(got["out"] == 0) and torch.all(torch.isneginf(got["lse"]))
    assert got["out"].shape == (1, 2, Lq, 16)
    assert all(torch.all(got[key] == 0) for key in ("dq", "dk", "dv"))


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
    _compare(_inputs("triton-decode", 2, 4, 1, 3, 80, 16, 24), kw)
    assert decode_everywhere and decode_everywhere[0] > 1  # several splits were merged


@needs_interp
def test_decode_not_used_for_long_queries(decode_everywhere):
    q, k, v = (t.float() for t in _inputs("triton-no-decode", 1, 2, 1, 20, 40, 16, 16))
    qkv.attention(q, k, v, backend="triton")
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
        results[name] = dict(zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), strict=True))
    for key, want in results["reference"].items():
        tol = TOL if key in ("out", "lse") else GRAD_TOL
        assert_close(results["triton"][key], want, tol[torch.float32], key)


def test_unsupported_features_are_named():
    q, k, v = _inputs("triton-float64", 1, 1, 1, 4, 4, 8, 8)
    with pytest.raises(NotImplementedError, match="dtype"):
        qkv.attention(q, k, v, backend="triton")
    if CPU_OK:
        q, k, v = (t.float() for t in _inputs("triton-dim-512", 1, 1, 1, 4, 4, 512, 8))
        with pytest.raises(NotImplementedError, match="head dim"):
            qkv.attention(q, k, v, backend="triton")


def test_auto_never_picks_triton_on_the_cpu():
    q, k, v = (t.float() for t in _inputs("triton-auto", 1, 2, 2, 8, 8, 16, 16))
    call = importlib.import_module("qkv.attention.spec").check_call(q, k, v, softcap=1.0,
                                                                  return_lse=True)
    assert registry.choose(call, q, "auto").name != "triton"


def _unequal_shapes() -> list[tuple[int, int]]:
    """Every BLOCK_M : BLOCK_N ratio other than 1 of the GPU's config lists, the smaller side
    16 (the interpreter's cost grows with the tile)."""
    cfgs = importlib.import_module("qkv.attention.triton.launch").CONFIGS.values()
    return sorted({(16 * bm // min(bm, bn), 16 * bn // min(bm, bn))
                   for pairs in cfgs for bm, bn, _, _ in pairs if bm != bn})


@needs_interp
@pytest.mark.parametrize("blocks", _unequal_shapes())
@pytest.mark.parametrize("name", ["plain", "causal_lq_gt_lk", "window_causal",
                                  "kv_lengths_causal", "mask", "dropout"])
def test_unequal_block_shapes_match_reference(name, blocks, monkeypatch):
    """The GPU's autotuned configs use BLOCK_M != BLOCK_N (ratios 1:4 to 4:1); the block-range
    logic must hold for each ratio they use."""
    monkeypatch.setattr(importlib.import_module("qkv.attention.triton.launch"),
                        "INTERPRET_BLOCKS", blocks)
    _compare(*_feature_case(name))


# Plain float32 autograd (softmax(s) @ v) stays within 1.2e-7 of the largest gradient on the
# cases below; the kernels with a folded float32 lse were off by 3e-3 (scale 30) to 0.1 (1e4),
# and with delta = rowsum(dO ∘ O) alone by 3e-6 to 0.04.
GRAD_RTOL = 2e-5


@needs_interp
@pytest.mark.parametrize("scale, kind, with_lse", [
    (30.0, "one_hot", False), (300.0, "one_hot", False), (1e3, "one_hot", False),
    (1e4, "one_hot", False), (-1e4, "one_hot", False), (-1e4, "one_hot", True),
    (1e4, "ties", False)])
def test_float32_gradients_hold_at_large_scores(scale, kind, with_lse):
    """q = k = v (1, 3, 64, 64), so |s| reaches 1e6 and each row's weights are one-hot (or,
    with every key twice, split between two tied keys): the exact dS is about 0, and the
    backward must rebuild p and delta = rowsum(p ∘ dP) as exactly as plain float32 autograd
    does, to GRAD_RTOL of the largest gradient."""
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kv = x if kind == "one_hot" else x.repeat_interleave(2, dim=2)
    inputs, kw = (x, kv, kv), {"scale": scale}
    got = run("triton", inputs, kw, torch.float32, with_lse=with_lse)
    ref = reference_run(inputs, kw, torch.float32, with_lse=with_lse)
    top = max(ref[key].abs().max().item() for key in ("dq", "dk", "dv"))
    for key in ("out", "dq", "dk", "dv"):
        assert_close(got[key], ref[key], (GRAD_RTOL * top, 0.0), f"scale {scale}: {key}")


@needs_interp
@pytest.mark.parametrize("name", ["kv_lengths_causal", "softcap_alibi", "bias_full_grad",
                                  "mask", "dropout"])
def test_exact_delta_pass_matches_reference(name, monkeypatch):
    """The exact-delta pass runs only for large scores; forced on for every block, it must still
    agree with the reference on every feature that touches dS (lse gradient included)."""
    monkeypatch.setattr(importlib.import_module("qkv.attention.triton.kernels_bwd"),
                        "LARGE_SCORE", -1.0)
    _compare(*_feature_case(name))


# ---- on a real GPU ---------------------------------------------------------------------------

def _cuda_run(inputs, kw, dtype):
    """`_support.run` of triton on CUDA, results back on the CPU: `run` draws its cotangents on
    the CPU, so this draws the same ones and moves them to the device."""
    kw = {n: x.cuda() if torch.is_tensor(x) else x for n, x in kw.items()}
    (q, k, v), kw = cast([t.cuda() for t in inputs], kw, dtype, grad_bias=True)
    torch.manual_seed(0)
    out, lse = qkv.attention(q, k, v, backend="triton", return_lse=True, **kw)
    g = torch.Generator().manual_seed(1234)
    dout = torch.randn(out.shape, dtype=torch.float64, generator=g).cuda()
    dlse = torch.randn(lse.shape, dtype=torch.float64, generator=g).cuda()
    ((out.double() * dout).sum() + (torch.where(torch.isfinite(lse), lse, 0.0).double()
                                     * dlse).sum()).backward()
    got = {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    if "bias" in kw:
        got["dbias"] = kw["bias"].grad
    return {key: t.detach().cpu() for key, t in got.items()}


def _cuda_compare(inputs, kw, dtype, tol, grad_tol):
    got = _cuda_run(inputs, kw, dtype)
    ref = reference_run(inputs, kw, dtype, with_lse=True)
    for key, value in got.items():
        assert_close(value, ref[key], tol if key in ("out", "lse") else grad_tol, key)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"window": (100, 0)},
                                {"bias": torch.randn(1, 8, 1, 300)},
                                {"dropout_p": 0.1, "causal": True}],
                         ids=["plain", "causal", "window", "bias", "dropout"])
def test_gpu_matches_reference(dtype, kw):
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    _cuda_compare(_inputs("triton-gpu", 2, 8, 2, 257, 300, 128, 128), kw, dtype,
                  (tol, tol), (tol * 8, tol * 8))


@gpu
@needs_cuda
@pytest.mark.parametrize("d, dv", [(64, 64), (96, 48), (256, 256)])
def test_gpu_fp32_and_head_dims(d, dv):
    _cuda_compare(_inputs("triton-gpu-fp32", 1, 4, 4, 200, 200, d, dv), {"causal": True},
                  torch.float32, (1e-4, 1e-4), (1e-3, 1e-3))


@gpu
@needs_cuda
def test_gpu_backward_is_deterministic():
    inputs = _inputs("triton-gpu-determinism", 2, 16, 4, 1024, 1024, 128, 128)
    first = _cuda_run(inputs, {"causal": True}, torch.bfloat16)
    second = _cuda_run(inputs, {"causal": True}, torch.bfloat16)
    for key in ("dq", "dk", "dv"):
        assert torch.equal(first[key], second[key]), key


@gpu
@needs_cuda
def test_gpu_decode_matches_reference(decode_everywhere):
    q, k, v = (t.to("cuda", torch.bfloat16)
               for t in _inputs("triton-gpu-decode", 4, 32, 8, 1, 8192, 128, 128))
    kv_lengths = torch.tensor([8192, 100, 0, 5000])
    out = qkv.attention(q, k, v, kv_lengths=kv_lengths.cuda(), backend="triton")
    want = qkv.attention(q.double(), k.double(), v.double(), kv_lengths=kv_lengths.cuda(),
                         backend="reference")
    assert_close(out.cpu(), want.cpu(), (2e-2, 2e-2), "out")
    assert decode_everywhere[0] > 1


@gpu
@needs_cuda
def test_gpu_auto_prefers_triton():
    assert registry.backends("cuda")[0] == "triton"
