"""The conformance matrix: every backend against the float64 reference.

Each case is run forward and backward on a backend (in float64 where it accepts it, else
float32) and on the reference in float64 with the same rounded inputs; out, lse and the
gradients of q, k, v and bias must agree. `with_lse` also sends a gradient through the lse.
With QKV_TEST_DEVICE=cuda the backends run on CUDA tensors and the reference stays on the CPU
(`_support`).
"""

from __future__ import annotations

import pytest
import torch

import qkv

from ._support import (
    DEVICE,
    GRAD_TOL,
    LOW_PRECISION,
    TOL,
    Case,
    assert_close,
    assert_matches,
    best_dtype,
    cast,
    check_cap,
    make_inputs,
    reference_run,
    refused,
    run,
)

C = Case
CASES = [
    # one keyword at a time
    C("plain"),
    C("causal", kw={"causal": True}),
    C("window", kw={"window": (7, 5)}),
    C("window_left", kw={"window": (9, None)}),
    C("window_right", kw={"window": (None, 4)}),
    C("window_zero", kw={"window": (0, 0)}),
    C("kv_lengths", kv_lengths=(45, 20)),
    C("kv_lengths_zero", kv_lengths=(0, 33)),
    C("mask_full", mask="full"),
    C("mask_keys", mask="keys"),
    C("mask_2d", mask="2d"),
    C("mask_rows", mask="rows"),
    C("mask_heads", mask="heads"),
    C("bias_full", bias="full"),
    C("bias_keys", bias="keys"),
    C("bias_2d", bias="2d"),
    C("bias_rows", bias="rows"),
    C("alibi_h", alibi="h"),
    C("alibi_bh", alibi="bh"),
    C("softcap", kw={"softcap": 2.5}),
    C("scale", kw={"scale": 0.37}),
    C("dropout", kw={"dropout_p": 0.3}),
    # combinations
    C("causal_window", kw={"causal": True, "window": (6, None)}),
    C("causal_kv_lengths", kv_lengths=(30, 45), kw={"causal": True}),
    C("causal_mask_bias", mask="full", bias="full", kw={"causal": True}),
    C("causal_alibi", alibi="bh", kw={"causal": True}),
    C("softcap_bias", bias="full", kw={"softcap": 1.5}),
    C("softcap_alibi_causal", alibi="h", kw={"softcap": 3.0, "causal": True}),
    C("window_kv_lengths_mask", mask="keys", kv_lengths=(40, 17), kw={"window": (10, 3)}),
    C("dropout_causal_bias", bias="2d", kw={"causal": True, "dropout_p": 0.2}),
    C("dropout_softcap", kw={"softcap": 2.0, "dropout_p": 0.1}),
    C("everything", mask="full", bias="full", alibi="bh", kv_lengths=(41, 29),
      kw={"causal": True, "window": (12, 2), "softcap": 4.0, "scale": 0.3, "dropout_p": 0.15}),
    # Lq != Lk both ways (bottom-right alignment)
    C("lq_gt_lk_causal", Lq=45, Lk=29, kw={"causal": True}),
    C("lq_gt_lk_window", Lq=50, Lk=20, kw={"window": (3, 3)}),
    C("lq_gt_lk_alibi", Lq=40, Lk=21, alibi="h"),
    C("lq_lt_lk_causal_window", Lq=9, Lk=60, kw={"causal": True, "window": (20, None)}),
    C("decode", Lq=1, Lk=61),
    C("decode_causal_kv_lengths", Lq=1, Lk=61, kv_lengths=(61, 13), kw={"causal": True}),
    C("decode_long", Lq=1, Lk=300, alibi="h", kw={"causal": True, "window": (200, 0)}),
    # head dims, Dv != D
    C("d24", D=24, Dv=24, kw={"causal": True}),
    C("d40_dv24", D=40, Dv=24),
    C("d16_dv72", D=16, Dv=72, kw={"causal": True}),
    C("d72", D=72, Dv=72, Lq=21, Lk=35),
    C("d96", D=96, Dv=96, Lq=21, Lk=35, kw={"causal": True}),
    C("d160", D=160, Dv=160, Lq=19, Lk=33),
    C("d256", D=256, Dv=256, Lq=17, Lk=40, kw={"causal": True}),
    # lengths that are not multiples of any block, longer than several blocks
    C("long_ragged", B=1, Lq=83, Lk=131, kw={"causal": True}),
    C("long_window", B=1, Lq=100, Lk=100, kw={"window": (17, 9)}),
    # grouped-query and multi-query
    C("gqa", Hq=4, Hk=2, kw={"causal": True}),
    C("mqa", Hq=4, Hk=1, mask="rows", alibi="bh"),
    C("mqa_bias_decode", Hq=6, Hk=1, Lq=1, Lk=50, bias="full"),
    # rows with no visible key
    C("empty_rows_mask", mask="empty_rows"),
    C("empty_rows_causal", Lq=40, Lk=10, kw={"causal": True}),
    C("empty_rows_window", Lq=30, Lk=12, kv_lengths=(0, 12), kw={"window": (3, 0)}),
]


@pytest.mark.parametrize("with_lse", [False, True], ids=["out", "lse"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(backend, case, with_lse):
    check_cap(backend, case)
    dtype = best_dtype(backend)
    inputs, kw = make_inputs(case)
    got = run(backend, inputs, kw, dtype, with_lse=with_lse)
    ref = reference_run(inputs, kw, dtype, with_lse=with_lse)
    assert_matches(got, ref, dtype)


LOW_PRECISION_CASES = [
    C("lp_plain", Lq=33, Lk=47, D=32, Dv=32),
    C("lp_causal_gqa", Hq=4, Hk=2, Lq=33, Lk=47, D=64, Dv=64, kw={"causal": True}),
    C("lp_bias_alibi", Lq=1, Lk=64, bias="keys", alibi="h", kv_lengths=(64, 20)),
    C("lp_softcap", kw={"softcap": 5.0, "causal": True}),
]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=str)
def test_low_precision_matches_reference(backend, case, dtype):
    check_cap(backend, case)
    inputs, kw = make_inputs(case)
    got = run(backend, inputs, kw, dtype, with_lse=False)
    ref = reference_run(inputs, kw, dtype, with_lse=False)
    assert got["out"].dtype == dtype
    assert got["dq"].dtype == dtype
    assert_matches(got, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_large_logits_are_finite_and_accurate(backend, dtype, causal):
    """Logits in the thousands: the online softmax must not overflow in low precision."""
    case = C(f"large_{dtype}_{causal}", B=1, Lq=40, Lk=56, D=64, Dv=64, kw={"causal": causal})
    check_cap(backend, case)
    (q, k, v), kw = make_inputs(case)
    inputs = (q * 12, k * 12, v)  # scale=1 below: logits of order 10^3 to 10^4
    kw["scale"] = 1.0
    got = run(backend, inputs, kw, dtype, with_lse=False)
    ref = reference_run(inputs, kw, dtype, with_lse=False)
    assert torch.isfinite(got["out"]).all()
    # The forward output is a near one-hot blend; fp16/bf16 rounding of out is all we allow.
    assert_close(got["out"], ref["out"], TOL[dtype], "out")
    for key in ("dq", "dk", "dv"):
        assert torch.isfinite(got[key]).all(), key


def _attend_with_lse(backend, q, k, v, kw):
    """(out, lse), with lse None where the backend cannot return it."""
    try:
        return qkv.attention(q, k, v, return_lse=True, backend=backend, **kw)
    except NotImplementedError as err:
        assert "return_lse" in str(err) and backend in str(err)
        return qkv.attention(q, k, v, backend=backend, **kw), None


def test_empty_rows_are_zero_with_no_gradient(backend):
    """Rows that see no key: zeros out, lse -inf, zero gradient, never NaN."""
    case = C("empty_rows_explicit", Lq=24, Lk=16, mask="empty_rows", kv_lengths=(0, 16),
             kw={"causal": True})
    check_cap(backend, case)
    dtype = best_dtype(backend)
    inputs, kw = make_inputs(case)
    ref = reference_run(inputs, kw, dtype, with_lse=True)
    empty = torch.isneginf(ref["lse"])  # (B, Hq, Lq)
    assert empty[0].all() and empty[:, :, ::3].all() and empty[1, :, :7].all()
    (q, k, v), kw = cast(inputs, kw, dtype, grad_bias=False)
    out, lse = _attend_with_lse(backend, q, k, v, kw)
    out = out.cpu()
    if lse is not None:
        assert torch.equal(torch.isneginf(lse.cpu()), empty)
    assert not torch.isnan(out).any()
    assert (out[empty] == 0).all()
    out.sum().backward()
    dq, dk, dv = (t.grad.cpu() for t in (q, k, v))
    for g in (dq, dk, dv):
        assert not torch.isnan(g).any()
    assert (dq[empty] == 0).all()
    assert (dk[0] == 0).all() and (dv[0] == 0).all()


def _noncontiguous(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as `t` (B, H, L, D), laid out without contiguity."""
    if how == "transposed":  # stored as (B, L, H, D), as a projection produces it
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    B, H, L, D = t.shape  # "sliced": every other position of a longer, wider buffer
    big = torch.zeros(B, H, 2 * L, D + 8, dtype=t.dtype, device=t.device)
    big[:, :, ::2, 3:3 + D] = t
    return big[:, :, ::2, 3:3 + D]


@pytest.mark.parametrize("how", ["transposed", "sliced"])
def test_noncontiguous_inputs(backend, how):
    case = C(f"noncontig_{how}", Hq=4, Hk=2, Lq=33, Lk=40, D=24, Dv=16, bias="rows",
             kw={"causal": True})
    check_cap(backend, case)
    dtype = best_dtype(backend)
    inputs, kw = make_inputs(case)
    q, k, v = (_noncontiguous(t.to(DEVICE, dtype), how).requires_grad_() for t in inputs)
    assert not any(t.is_contiguous() for t in (q, k, v))
    out = qkv.attention(q, k, v, backend=backend, **kw | {"bias": kw["bias"].to(DEVICE, dtype)})
    out.sum().backward()
    rq, rk, rv = (t.to(dtype).double().requires_grad_() for t in inputs)
    rout = qkv.attention(rq, rk, rv, backend="reference",
                         **kw | {"bias": kw["bias"].to(dtype).double()})
    rout.sum().backward()
    assert_close(out, rout.detach(), TOL[dtype], "out")
    for name, a, e in (("dq", q.grad, rq.grad), ("dk", k.grad, rk.grad), ("dv", v.grad, rv.grad)):
        assert_close(a, e, GRAD_TOL[dtype], name)


def test_gradient_through_lse_only(backend):
    """A loss of the lse alone: v receives no gradient, q and k do, as in the reference."""
    case = C("lse_only", Hq=4, Hk=2, mask="full", kw={"causal": True})
    check_cap(backend, case)
    dtype = best_dtype(backend)
    inputs, kw = make_inputs(case)
    grads = []
    for name, dt, dev in ((backend, dtype, DEVICE), ("reference", torch.float64, "cpu")):
        q, k, v = (t.to(dtype).to(dev, dt).requires_grad_() for t in inputs)
        kw = {key: value.to(dev) if isinstance(value, torch.Tensor) else value
              for key, value in kw.items()}
        try:
            _, lse = qkv.attention(q, k, v, return_lse=True, backend=name, **kw)
        except NotImplementedError as err:
            refused(name, err, kw | {"return_lse": True})
        torch.where(torch.isfinite(lse), lse, 0.0).sum().backward()
        dv = torch.zeros_like(v) if v.grad is None else v.grad  # v may not be in the graph
        grads.append((q.grad, k.grad, dv))
    for name, a, e in zip(("dq", "dk", "dv"), grads[0], grads[1], strict=True):
        assert_close(a, e, GRAD_TOL[dtype], name)
    assert (grads[0][2] == 0).all()


@pytest.mark.parametrize(("B", "Lq", "Lk"), [(0, 5, 7), (2, 0, 7), (2, 5, 0)],
                         ids=["no_batch", "no_queries", "no_keys"])
def test_degenerate_shapes(backend, B, Lq, Lk):
    """Empty batch, no queries, no keys: right shapes, zeros, gradients that exist."""
    dtype = best_dtype(backend)
    f = dict(dtype=dtype, device=DEVICE, requires_grad=True)
    q = torch.randn(B, 4, Lq, 8, **f)
    k, v = torch.randn(B, 2, Lk, 8, **f), torch.randn(B, 2, Lk, 6, **f)
    out = qkv.attention(q, k, v, causal=True, kv_lengths=torch.full((B,), Lk, device=DEVICE),
                        mask=torch.ones(Lq, Lk, dtype=torch.bool, device=DEVICE), backend=backend)
    assert out.shape == (B, 4, Lq, 6)
    assert (out == 0).all()
    out.sum().backward()
    assert q.grad.shape == q.shape and (q.grad == 0).all()


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_lse_is_float32(backend, dtype):
    q = torch.randn(1, 2, 5, 8, dtype=dtype, device=DEVICE)
    try:
        out, lse = qkv.attention(q, q, q, return_lse=True, backend=backend)
    except NotImplementedError as err:
        refused(backend, err, {"return_lse": True})
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (1, 2, 5)
