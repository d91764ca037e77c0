"""A few small calls that every backend runs by default, slow ones (Triton's interpreter) too.

They pack many features into each call so that a slow backend is exercised widely in seconds;
the full matrix (test_matrix.py) runs for slow backends under `-m slow`.
"""

from __future__ import annotations

import pytest
import torch

import qkv

from ._support import (
    TOL,
    Case,
    assert_close,
    assert_matches,
    best_dtype,
    make_inputs,
    reference_run,
    run,
)

C = Case
SMOKE = [
    C("smoke_features", Hq=4, Hk=2, Lq=19, Lk=27, D=24, Dv=16, mask="keys", bias="full",
      alibi="h", kv_lengths=(27, 11), kw={"causal": True, "window": (9, None), "scale": 0.4}),
    C("smoke_softcap_dropout", Lq=17, Lk=17, D=16, Dv=16,
      kw={"softcap": 3.0, "dropout_p": 0.2, "causal": True}),
    C("smoke_decode_mqa", Hq=4, Hk=1, Lq=1, Lk=40, D=32, Dv=32, kv_lengths=(40, 9),
      kw={"causal": True}),
    C("smoke_empty_rows", Lq=20, Lk=8, D=16, Dv=8, mask="empty_rows", kw={"causal": True}),
]


@pytest.mark.parametrize("with_lse", [False, True], ids=["out", "lse"])
@pytest.mark.parametrize("case", SMOKE, ids=str)
def test_smoke_matches_reference(any_backend, case, with_lse):
    dtype = best_dtype(any_backend)
    inputs, kw = make_inputs(case)
    got = run(any_backend, inputs, kw, dtype, with_lse=with_lse)
    ref = reference_run(inputs, kw, dtype, with_lse=with_lse)
    assert_matches(got, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_smoke_low_precision(any_backend, dtype):
    case = C("smoke_lp", Hq=2, Hk=1, Lq=21, Lk=30, D=32, Dv=32, kw={"causal": True})
    inputs, kw = make_inputs(case)
    got = run(any_backend, inputs, kw, dtype, with_lse=False)
    ref = reference_run(inputs, kw, dtype, with_lse=False)
    assert got["out"].dtype == dtype
    assert_matches(got, ref, dtype)


def test_smoke_varlen(any_backend):
    dtype = best_dtype(any_backend)
    g = torch.Generator().manual_seed(0)
    lq, lk = [5, 0, 9], [7, 3, 4]
    q = torch.randn(sum(lq), 2, 16, dtype=torch.float64, generator=g).to(dtype)
    k = torch.randn(sum(lk), 2, 16, dtype=torch.float64, generator=g).to(dtype)
    v = torch.randn(sum(lk), 2, 16, dtype=torch.float64, generator=g).to(dtype)
    cq = torch.tensor([0, 5, 5, 14], dtype=torch.int32)
    ck = torch.tensor([0, 7, 10, 14], dtype=torch.int32)
    out = qkv.attention_varlen(q, k, v, cq, ck, causal=True, backend=any_backend)
    want = qkv.attention_varlen(q.double(), k.double(), v.double(), cq, ck, causal=True,
                                backend="reference")
    assert_close(out, want, TOL[dtype], "out")
