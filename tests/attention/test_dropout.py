"""Dropout: a counter-based mask, reproducible from torch's seed and shared by every backend."""

from __future__ import annotations

import pytest
import torch

import qkv

from ._support import refused


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 37, 16, dtype=dtype, generator=g)
    k = torch.randn(2, 2, 45, 16, dtype=dtype, generator=g)
    v = torch.randn(2, 2, 45, 8, dtype=dtype, generator=g)
    return q, k, v


def _dropped(backend, q, k, v, seed, **kw):
    torch.manual_seed(seed)
    try:
        return qkv.attention(q, k, v, dropout_p=0.3, backend=backend, **kw)
    except NotImplementedError as err:
        refused(backend, err, kw | {"dropout_p": 0.3})


def test_same_seed_same_result(backend):
    q, k, v = _inputs(torch.float32)
    a = _dropped(backend, q, k, v, seed=3, causal=True)
    b = _dropped(backend, q, k, v, seed=3, causal=True)
    c = _dropped(backend, q, k, v, seed=4, causal=True)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("kw", [{}, {"causal": True, "softcap": 3.0}], ids=["plain", "causal"])
def test_chunked_draws_the_reference_mask(kw):
    q, k, v = _inputs()
    a = _dropped("reference", q, k, v, seed=5, **kw)
    b = _dropped("chunked", q, k, v, seed=5, **kw)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_dropout_keeps_the_expected_fraction_and_scales():
    """Weights survive with probability 1 - p and are scaled by 1 / (1 - p)."""
    q = torch.zeros(1, 2, 64, 8, dtype=torch.float64)  # uniform weights 1/Lk
    k = torch.zeros(1, 2, 256, 8, dtype=torch.float64)
    v = torch.eye(256, dtype=torch.float64)[None, None].expand(1, 2, 256, 256)
    torch.manual_seed(0)
    w = qkv.attention(q, k, v, dropout_p=0.25, backend="chunked")  # w[..., j] = kept_j/(.75*256)
    kept = w * 256 * 0.75
    assert torch.allclose(kept, kept.round(), atol=1e-9)
    assert set(kept.round().unique().tolist()) <= {0.0, 1.0}
    assert abs(kept.mean().item() - 0.75) < 0.01


def test_dropout_gradient_uses_the_same_mask():
    """Backward of chunked recomputes the mask: gradients equal the reference's."""
    q, k, v = (t.requires_grad_() for t in _inputs())
    rq, rk, rv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    _dropped("chunked", q, k, v, seed=9, causal=True).sum().backward()
    _dropped("reference", rq, rk, rv, seed=9, causal=True).sum().backward()
    for a, e in ((q, rq), (k, rk), (v, rv)):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-10, atol=1e-10)
