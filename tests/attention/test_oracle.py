"""An independent brute-force oracle, written from DESIGN.md with Python loops over (b, h, i, j).

The reference and chunked backends share the mask helper in `masking.py`; this file checks that
helper (and the reference built on it) against the rules as the design states them.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import qkv
from qkv.attention.masking import visible
from qkv.attention.spec import check_call


def sees(i, j, b, h, *, Lq, Lk, causal, window, kv_lengths, mask, offset=None):
    """DESIGN.md, Visibility: query i may see key j only if every condition set holds."""
    ip = i + (Lk - Lq if offset is None else offset[b])
    if causal and not j <= ip:
        return False
    if window is not None:
        left, right = window
        if left is not None and not ip - left <= j:
            return False
        if right is not None and not j <= ip + right:
            return False
    if kv_lengths is not None and not j < kv_lengths[b]:
        return False
    return mask is None or mask[b][h][i][j]


def full(t: torch.Tensor, shape) -> list:
    """A mask or bias broadcast to `shape` (DESIGN.md: broadcastable to (B, Hq, Lq, Lk))."""
    return t.reshape((1,) * (len(shape) - t.dim()) + tuple(t.shape)).expand(shape).tolist()


def brute_force(q, k, v, *, causal=False, window=None, kv_lengths=None, mask=None, bias=None,
                alibi_slopes=None, softcap=None, scale=None, offset=None):
    """out (B, Hq, Lq, Dv) and lse (B, Hq, Lq) as nested Python floats, then tensors."""
    B, Hq, Lq, D = q.shape
    Hk, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1 / math.sqrt(D) if scale is None else scale
    kvl = None if kv_lengths is None else kv_lengths.tolist()
    mask, bias = (None if t is None else full(t, (B, Hq, Lq, Lk)) for t in (mask, bias))
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.expand(B, Hq).tolist()
    q, k, v = q.tolist(), k.tolist(), v.tolist()
    out = torch.zeros(B, Hq, Lq, Dv, dtype=torch.float64)
    lse = torch.full((B, Hq, Lq), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            hk = h // (Hq // Hk)  # grouped-query: query head h reads K/V head h // groups
            for i in range(Lq):
                ip = i + (Lk - Lq if offset is None else offset[b])
                s = {}
                for j in range(Lk):
                    if not sees(i, j, b, h, Lq=Lq, Lk=Lk, causal=causal, window=window,
                                kv_lengths=kvl, mask=mask, offset=offset):
                        continue
                    x = scale * sum(q[b][h][i][d] * k[b][hk][j][d] for d in range(D))
                    if softcap is not None:
                        x = softcap * math.tanh(x / softcap)
                    if bias is not None:
                        x += bias[b][h][i][j]
                    if alibi_slopes is not None:
                        x -= alibi_slopes[b][h] * abs(ip - j)
                    s[j] = x
                if not s:
                    continue  # no visible key: zeros, lse -inf
                m = max(s.values())
                total = sum(math.exp(x - m) for x in s.values())
                lse[b, h, i] = m + math.log(total)
                for e in range(Dv):
                    out[b, h, i, e] = sum(math.exp(x - m) / total * v[b][hk][j][e]
                                          for j, x in s.items())
    return out, lse


SHAPES = [(5, 7), (7, 4), (6, 6), (1, 9)]
KEYWORDS = {
    "none": {},
    "causal": {"causal": True},
    "window": {"window": (2, 1)},
    "window_left": {"window": (1, None)},
    "window_right": {"window": (None, 0)},
    "kv_lengths": {"kv_lengths": [3, 0]},
    "mask": {"mask": "full"},
    "mask_keys": {"mask": "keys"},
    "bias": {"bias": True},
    "alibi": {"alibi_slopes": "h"},
    "alibi_bh": {"alibi_slopes": "bh"},
    "softcap": {"softcap": 0.8},
    "scale": {"scale": 1.7},
    "causal_window_kv": {"causal": True, "window": (1, None), "kv_lengths": [4, 2]},
    "all": {"causal": True, "window": (3, 0), "kv_lengths": [9, 3], "mask": "full",
            "bias": True, "alibi_slopes": "bh", "softcap": 1.3, "scale": 0.9},
}


def _build(name, Lq, Lk, seed):
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hk, D, Dv = 2, 4, 2, 3, 2
    q = torch.randn(B, Hq, Lq, D, dtype=torch.float64, generator=g)
    k = torch.randn(B, Hk, Lk, D, dtype=torch.float64, generator=g)
    v = torch.randn(B, Hk, Lk, Dv, dtype=torch.float64, generator=g)
    kw = dict(KEYWORDS[name])
    if "kv_lengths" in kw:
        kw["kv_lengths"] = torch.tensor([min(n, Lk) for n in kw["kv_lengths"]])
    if kw.get("mask") == "full":
        kw["mask"] = torch.rand(B, Hq, Lq, Lk, generator=g) < 0.7
    elif kw.get("mask") == "keys":
        kw["mask"] = torch.rand(B, 1, 1, Lk, generator=g) < 0.7
    if kw.get("bias"):
        kw["bias"] = torch.randn(Lq, Lk, dtype=torch.float64, generator=g)
    if "alibi_slopes" in kw:
        shape = (Hq,) if kw["alibi_slopes"] == "h" else (B, Hq)
        kw["alibi_slopes"] = torch.rand(shape, dtype=torch.float64, generator=g)
    return q, k, v, kw


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(KEYWORDS))
def test_reference_equals_brute_force(name, shape):
    q, k, v, kw = _build(name, *shape, seed=zlib.crc32(f"{name}{shape}".encode()))
    want_out, want_lse = brute_force(q, k, v, **kw)
    for backend in ("reference", "chunked"):
        out, lse = qkv.attention(q, k, v, return_lse=True, backend=backend, **kw)
        torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", ["causal", "window", "kv_lengths", "mask", "mask_keys", "all"])
def test_visible_helper_equals_rules(name, shape):
    """The shared helper, on every block split, against the rule applied pair by pair."""
    q, k, v, kw = _build(name, *shape, seed=7)
    call = check_call(q, k, v, **kw)
    B, Hq, Lq, Lk = call.B, call.Hq, call.Lq, call.Lk
    kvl = None if call.kv_lengths is None else call.kv_lengths.tolist()
    mask = None if call.mask is None else full(call.mask, (B, Hq, Lq, Lk))
    want = torch.tensor([[[[sees(i, j, b, h, Lq=Lq, Lk=Lk, causal=call.causal,
                                 window=call.window, kv_lengths=kvl, mask=mask)
                            for j in range(Lk)] for i in range(Lq)] for h in range(Hq)]
                         for b in range(B)])
    for i0, i1, j0, j1 in [(0, Lq, 0, Lk), (1, Lq, 2, Lk), (0, 1, Lk - 1, Lk)]:
        got = visible(call, i0, i1, j0, j1, "cpu")
        got = torch.ones(1, 1, 1, 1, dtype=torch.bool) if got is None else got
        assert torch.equal(got.expand(B, Hq, i1 - i0, j1 - j0), want[:, :, i0:i1, j0:j1])


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_equals_brute_force(causal):
    """Packed sequences: each is its own bottom-right aligned problem."""
    lens_q, lens_k = [3, 0, 5, 2], [4, 3, 2, 0]
    g = torch.Generator().manual_seed(3)
    q = torch.randn(sum(lens_q), 2, 3, dtype=torch.float64, generator=g)
    k = torch.randn(sum(lens_k), 1, 3, dtype=torch.float64, generator=g)
    v = torch.randn(sum(lens_k), 1, 2, dtype=torch.float64, generator=g)
    slopes = torch.tensor([0.3, 0.7], dtype=torch.float64)
    cq = torch.tensor([0, 3, 3, 8, 10], dtype=torch.int32)
    ck = torch.tensor([0, 4, 7, 9, 9], dtype=torch.int32)
    for backend in ("reference", "chunked"):
        out, lse = qkv.attention_varlen(q, k, v, cq, ck, causal=causal, window=(2, None),
                                        alibi_slopes=slopes, return_lse=True, backend=backend)
        for b in range(4):
            rq, rk = slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1]))
            want_out, want_lse = brute_force(
                q[rq].transpose(0, 1)[None], k[rk].transpose(0, 1)[None],
                v[rk].transpose(0, 1)[None], causal=causal, window=(2, None),
                alibi_slopes=slopes)
            torch.testing.assert_close(out[rq], want_out[0].transpose(0, 1))
            torch.testing.assert_close(lse[rq], want_lse[0].transpose(0, 1))
