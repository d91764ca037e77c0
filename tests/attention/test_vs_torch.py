"""Every backend against torch's own scaled_dot_product_attention, where the semantics coincide.

An oracle independent of qkv's mask helper: no mask; Lq == Lk causal (`is_causal`, top-left,
equals bottom-right there); an explicit bool mask; and `causal_lower_right` for Lq != Lk.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import qkv

from ._support import GRAD_TOL, TOL, assert_close, best_dtype

# name -> (Lq, Lk, qkv keywords, torch keywords builder)
CASES = {
    "none": (29, 41, {}, lambda Lq, Lk, g: {}),
    "square_causal": (37, 37, {"causal": True}, lambda Lq, Lk, g: {"is_causal": True}),
    "bool_mask": (23, 40, {"mask": "mask"},
                  lambda Lq, Lk, g: {"attn_mask": torch.rand(2, 4, Lq, Lk, generator=g) < 0.8}),
    "lower_right_short_q": (7, 45, {"causal": True},
                            lambda Lq, Lk, g: {"attn_mask": causal_lower_right(Lq, Lk)}),
    "lower_right_decode": (1, 50, {"causal": True},
                           lambda Lq, Lk, g: {"attn_mask": causal_lower_right(Lq, Lk)}),
}


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch_sdpa(backend, name, gqa):
    Lq, Lk, kw, torch_kw = CASES[name]
    dtype = best_dtype(backend)
    g = torch.Generator().manual_seed(0)
    Hk = 2 if gqa else 4
    q = torch.randn(2, 4, Lq, 24, dtype=torch.float64, generator=g).to(dtype)
    k = torch.randn(2, Hk, Lk, 24, dtype=torch.float64, generator=g).to(dtype)
    v = torch.randn(2, Hk, Lk, 16, dtype=torch.float64, generator=g).to(dtype)
    tkw = torch_kw(Lq, Lk, g)
    kw = dict(kw)
    if kw.get("mask") == "mask":
        kw["mask"] = tkw["attn_mask"]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    out = qkv.attention(*leaves, backend=backend, **kw)
    want = F.scaled_dot_product_attention(*ref, enable_gqa=gqa, **tkw)
    assert_close(out, want, TOL[dtype], "out")
    dout = torch.randn(out.shape, dtype=torch.float64, generator=g)
    (out.double() * dout).sum().backward()
    (want * dout).sum().backward()
    for label, a, e in zip(("dq", "dk", "dv"), leaves, ref, strict=True):
        assert_close(a.grad, e.grad, GRAD_TOL[dtype], label)


def test_top_left_is_not_qkv_causal():
    """qkv's causal is bottom-right: it differs from torch's is_causal once Lq != Lk."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 3, 8, dtype=torch.float64, generator=g)
    k = torch.randn(1, 1, 6, 8, dtype=torch.float64, generator=g)
    out = qkv.attention(q, k, k, causal=True, backend="reference")
    top_left = F.scaled_dot_product_attention(q, k, k, is_causal=True)
    assert not torch.allclose(out, top_left)
    # The last query sees every key: it equals unmasked attention there.
    torch.testing.assert_close(out[:, :, -1], F.scaled_dot_product_attention(q, k, k)[:, :, -1])
