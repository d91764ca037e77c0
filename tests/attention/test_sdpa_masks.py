"""The sdpa backend hands torch masks in their smallest broadcast shape, and stays exact.

torch converts a bool mask to an additive one of the mask's own shape and reads it per head, so
a mask expanded to (B, Hq, Lq, Lk) costs Hq times one of (B, 1, Lq, Lk). These tests record what
`sdpa.forward` passes to torch: the mask keeps a heads dimension of 1 unless a per-head mask,
bias or ALiBi needs one, a batch dimension of 1 unless something per batch row does, and K/V
keep their own heads (enable_gqa). The results match the float64 reference, gradients included,
rows that see no key among them.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import qkv
from qkv.attention import sdpa

from ._support import GRAD_TOL, TOL, assert_close

B, HQ, HK, LQ, LK, D = 3, 4, 2, 9, 11, 8


@pytest.fixture
def seen(monkeypatch):
    """The mask, K and enable_gqa of every call sdpa.forward makes to torch SDPA."""
    calls = []

    def record(q, k, v, attn_mask=None, **kw):
        calls.append(types.SimpleNamespace(
            mask_shape=None if attn_mask is None else tuple(attn_mask.shape),
            mask_strides=None if attn_mask is None else attn_mask.stride(),
            k_shape=tuple(k.shape), enable_gqa=kw.get("enable_gqa", False)))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(sdpa, "F", types.SimpleNamespace(scaled_dot_product_attention=record))
    return calls


def _padding(pads=(0, 4, LK)) -> torch.Tensor:
    """(B, 1, 1, LK) left padding; the last row is all padding, so every query of it is empty."""
    return (torch.arange(LK).view(1, -1) >= torch.tensor(pads).view(-1, 1)).view(B, 1, 1, LK)


def _g() -> torch.Generator:
    return torch.Generator().manual_seed(7)


# name -> (Lq, keyword builder, shape of the mask torch must get)
CASES = {
    "padding_causal": (LQ, lambda g: dict(causal=True, mask=_padding()), (B, 1, LQ, LK)),
    "padding_only": (LQ, lambda g: dict(mask=_padding()), (B, 1, 1, LK)),
    "causal_short_q": (LQ, lambda g: dict(causal=True), (1, 1, LQ, LK)),
    "causal_kv_lengths": (LQ, lambda g: dict(causal=True, kv_lengths=torch.tensor([LK, 5, 0])),
                          (B, 1, LQ, LK)),
    "decode_kv_lengths": (1, lambda g: dict(kv_lengths=torch.tensor([LK, 3, 0])), (B, 1, 1, LK)),
    "window": (LQ, lambda g: dict(window=(3, 1)), (1, 1, LQ, LK)),
    "decode_causal": (1, lambda g: dict(causal=True), None),  # one query sees every key
    "head_mask": (LQ, lambda g: dict(mask=torch.rand(1, HQ, LQ, LK, generator=g) < 0.3),
                  (1, HQ, LQ, LK)),
    "head_bias_causal": (LQ, lambda g: dict(
        causal=True, bias=torch.randn(1, HQ, LQ, LK, dtype=torch.float64, generator=g)),
        (1, HQ, LQ, LK)),
    "row_bias_padding": (LQ, lambda g: dict(
        mask=_padding(), bias=torch.randn(LQ, 1, dtype=torch.float64, generator=g)),
        (B, 1, LQ, LK)),
    "alibi_h_causal": (LQ, lambda g: dict(
        causal=True, alibi_slopes=torch.rand(HQ, dtype=torch.float64, generator=g)),
        (1, HQ, LQ, LK)),
    "alibi_bh_padding": (LQ, lambda g: dict(
        mask=_padding(), alibi_slopes=torch.rand(B, HQ, dtype=torch.float64, generator=g)),
        (B, HQ, LQ, LK)),
}


def _inputs(lq: int, dtype: torch.dtype, g: torch.Generator):
    q = torch.randn(B, HQ, lq, D, dtype=torch.float64, generator=g)
    k = torch.randn(B, HK, LK, D, dtype=torch.float64, generator=g)
    v = torch.randn(B, HK, LK, D, dtype=torch.float64, generator=g)
    return [t.to(dtype) for t in (q, k, v)]


@pytest.mark.parametrize("name", list(CASES))
def test_mask_keeps_its_broadcast_shape(seen, name):
    lq, build, shape = CASES[name]
    q, k, v = _inputs(lq, torch.float32, _g())
    qkv.attention(q, k, v, backend="sdpa", **build(_g()))
    (call,) = seen
    assert call.mask_shape == shape
    assert call.k_shape == (B, HK, LK, D) and call.enable_gqa  # K/V never repeated
    # Nothing of size > 1 is a stride-0 view: torch reads no broadcast dimension twice.
    assert shape is None or all(
        s != 0 for n, s in zip(shape, call.mask_strides, strict=True) if n > 1)


def test_square_causal_needs_no_mask(seen):
    q, k, v = _inputs(LK, torch.float32, _g())
    qkv.attention(q, k, v, causal=True, backend="sdpa")
    assert seen[0].mask_shape is None


def test_decoding_step_needs_no_mask_and_no_top_left_causal(seen, monkeypatch):
    # Bottom-right causal with one query sees every key; torch's top-left is_causal would let
    # it see key 0 alone.
    q, k, v = _inputs(1, torch.float64, _g())
    out = qkv.attention(q, k, v, causal=True, backend="sdpa")
    assert seen[0].mask_shape is None
    want = qkv.attention(q, k, v, backend="reference")
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_with_gradients(name, dtype):
    """Out and every gradient (q, k, v and a bias) against the float64 reference; rows that
    see no key give zeros and no gradient, never NaN."""
    lq, build, _ = CASES[name]
    g = _g()
    kw = build(g)
    inputs = _inputs(lq, dtype, g)
    if "bias" in kw:
        inputs.append(kw.pop("bias").to(dtype))
    runs = []
    for backend, dt in (("sdpa", dtype), ("reference", torch.float64)):
        leaves = [t.to(dt).requires_grad_() for t in inputs]
        bias = {"bias": leaves[3]} if len(leaves) > 3 else {}
        kws = {n: t.to(dt) if n == "alibi_slopes" else t for n, t in kw.items()}
        out = qkv.attention(*leaves[:3], backend=backend, **bias, **kws)
        dout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator()
                           .manual_seed(3))
        grads = torch.autograd.grad((out.double() * dout).sum(), leaves)
        runs.append((out, grads))
    (out, grads), (want, want_grads) = runs
    assert not out.isnan().any()
    assert_close(out, want, TOL[dtype], "out")
    for label, a, e in zip(("dq", "dk", "dv", "dbias"), grads, want_grads, strict=False):
        assert not a.isnan().any(), label
        assert_close(a, e, GRAD_TOL[dtype], label)
    empty = torch.isneginf(qkv.attention(*[t.double() for t in inputs[:3]], return_lse=True,
                                         backend="reference", **kw_float64(kw))[1])
    if name in ("padding_causal", "causal_kv_lengths", "decode_kv_lengths"):
        assert empty.any()  # the case does test rows with no visible key
    assert (out[empty] == 0).all() and (grads[0][empty] == 0).all()


def kw_float64(kw: dict) -> dict:
    return {n: t.double() if n == "alibi_slopes" else t for n, t in kw.items()}
