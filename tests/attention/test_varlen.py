"""`qkv.attention_varlen` equals the sequences it packs, one by one and as a padded batch."""

from __future__ import annotations

import pytest
import torch

import qkv

from ._support import GRAD_TOL, SIZE_CAPS, TOL, assert_close, best_dtype, refused

# (lq, lk) per sequence: equal, longer and shorter keys, and empty sequences on either side.
LENGTHS = [(9, 9), (0, 5), (4, 0), (3, 21), (19, 6), (1, 33), (0, 0)]
KEYWORDS = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window": (4, 2)},
    "causal_window_alibi": {"causal": True, "window": (5, None), "alibi_slopes": "h"},
    "softcap_scale": {"softcap": 2.0, "scale": 0.5},
    "alibi_bh": {"alibi_slopes": "bh"},
    "dropout": {"dropout_p": 0.25},
}


def _packed(lengths, Hq, Hk, D, Dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(a for a, _ in lengths), sum(b for _, b in lengths)
    q = torch.randn(tq, Hq, D, dtype=torch.float64, generator=g).to(dtype)
    k = torch.randn(tk, Hk, D, dtype=torch.float64, generator=g).to(dtype)
    v = torch.randn(tk, Hk, Dv, dtype=torch.float64, generator=g).to(dtype)
    cq = torch.tensor([0] + [a for a, _ in lengths], dtype=torch.int32).cumsum(0).int()
    ck = torch.tensor([0] + [b for _, b in lengths], dtype=torch.int32).cumsum(0).int()
    return q, k, v, cq, ck


def _keywords(name, B, Hq):
    kw = dict(KEYWORDS[name])
    if kw.get("alibi_slopes") == "h":
        kw["alibi_slopes"] = torch.linspace(0.1, 0.6, Hq)
    elif kw.get("alibi_slopes") == "bh":
        kw["alibi_slopes"] = torch.linspace(0.1, 0.6, B * Hq).view(B, Hq)
    return kw


def _per_sequence(q, k, v, cq, ck, kw):
    """The reference, called once per sequence on (1, H, l, D) views of the packed tensors."""
    outs, lses = [], []
    for b in range(cq.numel() - 1):
        rq, rk = slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1]))
        kwb = dict(kw)
        if isinstance(kw.get("alibi_slopes"), torch.Tensor) and kw["alibi_slopes"].dim() == 2:
            kwb["alibi_slopes"] = kw["alibi_slopes"][b]
        out, lse = qkv.attention(q[rq].transpose(0, 1)[None], k[rk].transpose(0, 1)[None],
                                 v[rk].transpose(0, 1)[None], return_lse=True,
                                 backend="reference", **kwb)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0].transpose(0, 1))
    return torch.cat(outs), torch.cat(lses)


def _padded(q, k, v, lengths):
    """Packed (total, H, D) tensors -> zero-padded (B, H, L, D) batches."""
    out = []
    for t, which in ((q, 0), (k, 1), (v, 1)):
        sizes = [pair[which] for pair in lengths]
        padded = t.new_zeros(len(sizes), t.shape[1], max(sizes), t.shape[2])
        for b, part in enumerate(torch.split(t, sizes)):
            padded[b, :, :sizes[b]] = part.transpose(0, 1)
        out.append(padded)
    return out


def _fits(backend):
    cap = SIZE_CAPS.get(backend)
    return cap is None or max(max(a, b) for a, b in LENGTHS) <= cap["max_len"]


@pytest.mark.parametrize("name", [n for n in KEYWORDS if n != "dropout"])
def test_varlen_equals_each_sequence(backend, name):
    assert _fits(backend)
    dtype = best_dtype(backend)
    Hq, Hk = 4, 2
    q, k, v, cq, ck = _packed(LENGTHS, Hq, Hk, 16, 24, dtype)
    kw = _keywords(name, len(LENGTHS), Hq)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    try:
        out, lse = qkv.attention_varlen(*leaves, cq, ck, return_lse=True, backend=backend, **kw)
    except NotImplementedError as err:
        refused(backend, err, kw | {"return_lse": True})
    want_out, want_lse = _per_sequence(*ref_leaves, cq, ck, kw)
    assert_close(out, want_out, TOL[dtype], "out")
    assert_close(lse, want_lse, TOL[dtype], "lse")
    g = torch.Generator().manual_seed(5)
    dout = torch.randn(out.shape, dtype=torch.float64, generator=g)
    dlse = torch.randn(lse.shape, dtype=torch.float64, generator=g)
    for o, s in ((out, lse), (want_out, want_lse)):
        ((o.double() * dout).sum() + (torch.where(s.isfinite(), s, 0).double() * dlse).sum()
         ).backward()
    for label, a, e in zip(("dq", "dk", "dv"), leaves, ref_leaves, strict=True):
        assert_close(a.grad, e.grad, GRAD_TOL[dtype], label)


def test_varlen_without_lse_equals_each_sequence(backend):
    """The path every backend supports (sdpa has no lse): causal, forward and gradients."""
    dtype = best_dtype(backend)
    q, k, v, cq, ck = _packed(LENGTHS, 2, 1, 24, 16, dtype, seed=1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out = qkv.attention_varlen(*leaves, cq, ck, causal=True, backend=backend)
    want, _ = _per_sequence(*ref_leaves, cq, ck, {"causal": True})
    assert_close(out, want, TOL[dtype], "out")
    out.double().sum().backward()
    want.sum().backward()
    for label, a, e in zip(("dq", "dk", "dv"), leaves, ref_leaves, strict=True):
        assert_close(a.grad, e.grad, GRAD_TOL[dtype], label)


def test_varlen_equals_padded_batch(backend):
    """Without causal/window alignment, packing equals the padded batch with kv_lengths."""
    dtype = best_dtype(backend)
    lengths = [(5, 8), (7, 3), (2, 11)]
    q, k, v, cq, ck = _packed(lengths, 2, 2, 16, 16, dtype, seed=2)
    out = qkv.attention_varlen(q, k, v, cq, ck, backend=backend)
    kv_lengths = torch.tensor([b for _, b in lengths])
    padded = qkv.attention(*_padded(q, k, v, lengths), kv_lengths=kv_lengths,
                           backend="reference")
    want = torch.cat([padded[b, :, :lq].transpose(0, 1) for b, (lq, _) in enumerate(lengths)])
    assert_close(out, want, TOL[dtype], "out")


def test_varlen_dropout_draws_the_padded_batch_mask():
    """DESIGN: dropout of packed rows uses the mask of (b, h, i, j) inside each sequence."""
    lengths = [(5, 8), (7, 3), (2, 11)]
    q, k, v, cq, ck = _packed(lengths, 2, 2, 16, 16, torch.float64, seed=3)
    torch.manual_seed(11)
    out = qkv.attention_varlen(q, k, v, cq, ck, dropout_p=0.3, backend="chunked")
    torch.manual_seed(11)
    kv_lengths = torch.tensor([b for _, b in lengths])
    padded = qkv.attention(*_padded(q, k, v, lengths), kv_lengths=kv_lengths,
                           dropout_p=0.3, backend="reference")
    want = torch.cat([padded[b, :, :lq].transpose(0, 1) for b, (lq, _) in enumerate(lengths)])
    torch.testing.assert_close(out, want)


def test_varlen_dropout_matches_reference(backend):
    q, k, v, cq, ck = _packed(LENGTHS, 2, 2, 16, 16, best_dtype(backend), seed=4)
    kw = {"causal": True, "dropout_p": 0.2}
    torch.manual_seed(7)
    try:
        out = qkv.attention_varlen(q, k, v, cq, ck, backend=backend, **kw)
    except NotImplementedError as err:
        refused(backend, err, kw)
    torch.manual_seed(7)
    want = qkv.attention_varlen(q.double(), k.double(), v.double(), cq, ck, backend="reference",
                                **kw)
    assert_close(out, want, TOL[best_dtype(backend)], "out")


def test_varlen_accepts_int64_cu_seqlens(backend):
    """int32 and int64 offsets are both accepted, with the same result."""
    dtype = best_dtype(backend)
    q, k, v, cq, ck = _packed(LENGTHS, 2, 2, 16, 16, dtype, seed=6)
    want = qkv.attention_varlen(q, k, v, cq, ck, causal=True, backend=backend)
    got = qkv.attention_varlen(q, k, v, cq.long(), ck.long(), causal=True, backend=backend)
    assert torch.equal(got, want)


# Consecutive sequences of equal (lq, lk): inference runs each such run as one call.
RUN_LENGTHS = [(5, 5), (5, 5), (5, 5), (3, 7), (3, 7), (0, 0), (0, 0), (4, 2), (9, 9), (0, 3)]


@pytest.mark.parametrize("lengths", [LENGTHS, RUN_LENGTHS], ids=["distinct", "runs"])
@pytest.mark.parametrize("name", [n for n in KEYWORDS if n != "dropout"])
def test_varlen_inference_equals_each_sequence(backend, name, lengths):
    """Without gradients the packed rows go through `attention` one run of equal lengths at a
    time; results (and lse) equal each sequence on its own."""
    dtype = best_dtype(backend)
    Hq = 4
    q, k, v, cq, ck = _packed(lengths, Hq, 2, 16, 24, dtype, seed=7)
    kw = _keywords(name, len(lengths), Hq)
    with torch.no_grad():
        want_out, want_lse = _per_sequence(q.double(), k.double(), v.double(), cq, ck, kw)
        try:
            out = qkv.attention_varlen(q, k, v, cq, ck, backend=backend, **kw)
            assert_close(out, want_out, TOL[dtype], "out")
            out, lse = qkv.attention_varlen(q, k, v, cq, ck, return_lse=True, backend=backend,
                                            **kw)
        except NotImplementedError as err:
            refused(backend, err, kw | {"return_lse": True})
        assert_close(out, want_out, TOL[dtype], "out with lse")
        assert_close(lse, want_lse, TOL[dtype], "lse")
