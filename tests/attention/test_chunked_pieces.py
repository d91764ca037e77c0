"""The chunked backend's fused path (pieces.py) against its Python blocks and the reference.

The cut of each query block into pieces is checked exactly against `masking.visible`; the
numbers are checked in float64 on random bands: fused chunked, Python-only chunked (the same
backend with the fused path switched off) and the reference must agree on out, lse and every
gradient."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qkv
from qkv.attention import chunked, pieces
from qkv.attention.masking import visible
from qkv.attention.spec import check_call

PATTERN = {
    "full": lambda r, c: torch.ones(r, c, dtype=torch.bool),
    "causal": lambda r, c: torch.ones(r, c, dtype=torch.bool).tril(),
    "anticausal": lambda r, c: torch.ones(r, c, dtype=torch.bool).triu(),
}


@st.composite
def bands(draw):
    B = draw(st.integers(1, 3))
    Lq, Lk = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    if draw(st.booleans()):  # square calls are one kernel call: a path of their own
        Lk = Lq
    kw = {"causal": draw(st.booleans())}
    if draw(st.booleans()):
        side = st.one_of(st.none(), st.integers(0, 40))
        kw["window"] = (draw(side), draw(side))
    if draw(st.booleans()):
        kw["kv_lengths"] = torch.tensor(draw(st.lists(st.integers(0, Lk), min_size=B,
                                                      max_size=B)))
    offset = None
    if draw(st.booleans()):
        offset = torch.tensor(draw(st.lists(st.integers(-10, 40), min_size=B, max_size=B)))
    Hk = draw(st.integers(1, 2))
    shapes = (B, Hk * draw(st.integers(1, 2)), Hk, Lq, Lk)
    alibi = draw(st.sampled_from([None, "h", "bh"]))
    if alibi is not None:
        n = shapes[1] * (B if alibi == "bh" else 1)
        slopes = torch.tensor(draw(st.lists(st.floats(0.01, 2.0), min_size=n, max_size=n)))
        kw["alibi_slopes"] = slopes.view(B, -1) if alibi == "bh" else slopes
    return shapes, kw, offset, draw(st.sampled_from([1, 4, 8, 16, 64]))


def _tensors(shapes, dtype=torch.float64, D=8, seed=0):
    B, Hq, Hk, Lq, Lk = shapes
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, Hk, Lk, D, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v


@settings(max_examples=150, deadline=None, derandomize=True)
@given(case=bands())
def test_pieces_cover_exactly_the_visible_pairs(case):
    shapes, kw, offset, block_m = case
    q, k, v = _tensors(shapes)
    call = check_call(q, k, v, q_offset=offset, **kw)
    for g in pieces.groups(call):
        sub = pieces.subcall(call, g)
        assert g.keys == (call.Lk if call.kv_lengths is None else int(call.kv_lengths[g.b0]))
        for i0, i1, pcs in pieces.blocks(sub, g, block_m):
            vis = visible(sub, i0, i1, 0, call.Lk, q.device)
            vis = torch.ones(1, 1, i1 - i0, call.Lk, dtype=torch.bool) if vis is None else vis
            want = vis.expand(sub.B, 1, i1 - i0, call.Lk)[:, 0]
            if pcs is None:  # a window narrower than the block: all Python blocks
                assert kw.get("window") is not None
                continue
            covered = torch.zeros(i1 - i0, call.Lk, dtype=torch.int64)
            for p in pcs:
                assert 0 <= p.j0 < p.j1 <= g.keys
                covered[:, p.j0:p.j1] += 1
                if p.kind != "masked":
                    got = want[:, :, p.j0:p.j1]
                    assert torch.equal(got, PATTERN[p.kind](*got.shape[1:]).expand_as(got))
            assert covered.max() <= 1  # no key in two pieces
            assert not (want & (covered == 0)).any()  # every visible pair in some piece


def _grads(q, k, v, backend, kw, offset, out_w, lse_w):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if offset is None:
        out, lse = qkv.attention(q, k, v, backend=backend, return_lse=True, **kw)
    else:  # per-row offsets reach a backend only through a checked call
        call = check_call(q, k, v, q_offset=offset, return_lse=True, **kw)
        from qkv.attention import registry
        out, lse = registry.get(backend).forward(q, k, v, call)
    loss = (out * out_w).sum() + (lse.nan_to_num(neginf=0.0) * lse_w).sum()
    return (out, lse, *torch.autograd.grad(loss, (q, k, v)))


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bands(), with_dlse=st.booleans())
def test_fused_matches_python_blocks_and_reference(monkeypatch, case, with_dlse):
    shapes, kw, offset, block_m = case
    monkeypatch.setattr(chunked, "BLOCK_M", block_m)
    monkeypatch.setattr(chunked, "BLOCK_N", 16)
    q, k, v = _tensors(shapes)
    out_w = torch.randn(*q.shape[:3], q.shape[3], dtype=q.dtype)
    lse_w = torch.randn(q.shape[:3], dtype=q.dtype) if with_dlse else torch.zeros(q.shape[:3],
                                                                                  dtype=q.dtype)
    fused = _grads(q, k, v, "chunked", kw, offset, out_w, lse_w)
    want = _grads(q, k, v, "reference", kw, offset, out_w, lse_w)
    with monkeypatch.context() as m:
        m.setattr(pieces, "usable", lambda call, q: False)
        blocks = _grads(q, k, v, "chunked", kw, offset, out_w, lse_w)
    for got, python, ref in zip(fused, blocks, want, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(got, python, atol=1e-10, rtol=1e-9)


class _Count:
    def __init__(self, monkeypatch):
        self.forward = self.backward = 0
        fwd, bwd = pieces.forward, pieces.backward

        def counted_fwd(*a, **kw):
            self.forward += 1
            return fwd(*a, **kw)

        def counted_bwd(*a, **kw):
            self.backward += 1
            return bwd(*a, **kw)

        monkeypatch.setattr(pieces, "forward", counted_fwd)
        monkeypatch.setattr(pieces, "backward", counted_bwd)


# Kernel calls with the suite's blocks of 16 query rows (tests/attention/conftest.py), 64 rows.
@pytest.mark.parametrize("kw, calls", [
    ({}, 1),  # one call over everything
    ({"causal": True}, 1),  # square causal is the kernel's own causal
    ({"causal": True, "kv_lengths": torch.tensor([64, 64])}, 1),
    # per block: anticausal band (cut by 0 in block 1: Python), full part, causal band
    ({"window": (20, 0)}, 1 + 2 + 3 + 3),
    ({"kv_lengths": torch.tensor([50, 64])}, 2),  # one call per batch row of its own length
    # ALiBi: the causal half (band, plus the full part left of it after block 0) and the right
    # half (anticausal band and full part; the last band is cut by Lk: Python)
    ({"alibi_slopes": torch.tensor([0.5, 0.25])}, 7 + 6),
    ({"alibi_slopes": torch.tensor([0.5, 0.25]), "causal": True}, 7),
])
def test_band_calls_take_the_fused_kernel(monkeypatch, kw, calls):
    count = _Count(monkeypatch)
    q, k, v = (t.requires_grad_() for t in _tensors((2, 2, 2, 64, 64), torch.float32))
    qkv.attention(q, k, v, backend="chunked", **kw).sum().backward()
    assert count.forward == count.backward == calls


@pytest.mark.parametrize("kw", [{"softcap": 5.0}, {"dropout_p": 0.1},
                                {"bias": torch.zeros(1, 1, 32, 32)},
                                {"mask": torch.ones(32, 32, dtype=torch.bool).tril()}])
def test_other_features_stay_on_python_blocks(monkeypatch, kw):
    count = _Count(monkeypatch)
    q, k, v = _tensors((1, 2, 2, 32, 32), torch.float32)
    qkv.attention(q, k, v, backend="chunked", **kw)
    assert count.forward == 0


@pytest.mark.parametrize("Lq, Lk", [(0, 5), (5, 0), (0, 0)])
def test_empty_sides_do_not_reach_the_kernel(Lq, Lk):
    # torch's CPU flash kernel dies of a floating point exception on an empty side.
    q = torch.randn(1, 2, Lq, 8, requires_grad=True)
    k, v = (torch.randn(1, 2, Lk, 8, requires_grad=True) for _ in range(2))
    out = qkv.attention(q, k, v, backend="chunked", causal=Lq <= Lk)
    out.sum().backward()
    assert out.shape == (1, 2, Lq, 8) and not out.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_scores_keep_m_and_log_l_apart(dtype):
    q, k, v = _tensors((1, 2, 2, 48, 48), dtype)
    q = q * 40  # scores in the tens to hundreds
    call = check_call(q, k, v, causal=True)
    out, m, log_l = chunked.chunked_forward(q, k, v, call, 16, 16)
    large = m.abs() > chunked.LARGE_SCORE
    assert large.any() and (log_l[large] > 0).any()  # redone by the Python blocks
    assert (log_l[~large] == 0).any()  # the rest kept the fused lse
    ref, lse = qkv.attention(q.double(), k.double(), v.double(), causal=True,
                             backend="reference", return_lse=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close((m + log_l).double(), lse, atol=tol, rtol=tol)


@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"alibi_slopes": torch.tensor([0.5, 0.25])},
                                {"causal": True, "alibi_slopes": torch.tensor([0.5, 0.25])}])
def test_one_kernel_call_calls_match_reference(kw, with_lse):
    """Calls short enough to be one block: plain and square causal are one kernel call, and so
    is causal ALiBi's only half (its backward must keep ALiBi's column)."""
    kw = {key: val.double() if torch.is_tensor(val) else val for key, val in kw.items()}
    q, k, v = _tensors((2, 2, 2, 12, 12))
    out_w = torch.randn(q.shape, dtype=q.dtype)
    lse_w = torch.randn(q.shape[:3], dtype=q.dtype) * with_lse
    got = _grads(q, k, v, "chunked", kw, None, out_w, lse_w)
    want = _grads(q, k, v, "reference", kw, None, out_w, lse_w)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
