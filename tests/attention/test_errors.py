"""Bad calls raise ValueError (or NotImplementedError) naming the argument and what it got."""

from __future__ import annotations

import re

import pytest
import torch

import qkv
from qkv.attention.registry import get

from ._support import BACKENDS

B, HQ, HK, LQ, LK, D, DV = 2, 4, 2, 5, 7, 8, 6


def _qkv(dtype=torch.float32):
    return (torch.randn(B, HQ, LQ, D, dtype=dtype), torch.randn(B, HK, LK, D, dtype=dtype),
            torch.randn(B, HK, LK, DV, dtype=dtype))


def _replace(which, t):
    q, k, v = _qkv()
    return {"q": (t, k, v), "k": (q, t, v), "v": (q, k, t)}[which]


SHAPE_ERRORS = {
    "q_rank": (_replace("q", torch.randn(HQ, LQ, D)), r"q must be 4-D .*got 3-D .*\(4, 5, 8\)"),
    "k_rank": (_replace("k", torch.randn(1, B, HK, LK, D)), r"k must be 4-D .*got 5-D"),
    "v_not_tensor": (_replace("v", [[1.0]]), r"v must be a torch.Tensor, got list"),
    "batch": (_replace("k", torch.randn(3, HK, LK, D)), r"batch sizes differ: .*\(3, 2, 7, 8\)"),
    "head_dim": (_replace("k", torch.randn(B, HK, LK, D + 1)), r"k head dim .*\(2, 2, 7, 9\)"),
    "kv_heads": (_replace("v", torch.randn(B, HK + 1, LK, DV)), r"k and v must agree .*heads"),
    "kv_length": (_replace("v", torch.randn(B, HK, LK + 1, DV)), r"k and v must agree.*length"),
    "groups": ((torch.randn(B, HQ, LQ, D), torch.randn(B, 3, LK, D), torch.randn(B, 3, LK, DV)),
               r"multiple of k/v heads, got Hq=4 .*Hk=3"),
    "int_dtype": (_replace("q", torch.ones(B, HQ, LQ, D, dtype=torch.int64)),
                  r"q must be float16, bfloat16, float32 or float64, got torch.int64"),
    "bool_dtype": (_replace("v", torch.ones(B, HK, LK, DV, dtype=torch.bool)), r"v must be .*bool"),
    "mixed_dtypes": (_replace("k", torch.randn(B, HK, LK, D, dtype=torch.float16)),
                     r"share one dtype, got torch.float32, torch.float16, torch.float32"),
    "device": (_replace("v", torch.randn(B, HK, LK, DV, device="meta")),
               r"one device, got cpu, cpu, meta"),
}


@pytest.mark.parametrize("name", list(SHAPE_ERRORS))
def test_shape_dtype_device_errors(name):
    args, match = SHAPE_ERRORS[name]
    with pytest.raises(ValueError, match=match):
        qkv.attention(*args)


OPTION_ERRORS = {
    "window_not_pair": ({"window": 3}, r"window must be a pair \(left, right\), got 3"),
    "window_triple": ({"window": (1, 2, 3)}, r"window must be a pair .*\(1, 2, 3\)"),
    "window_negative": ({"window": (-1, 2)}, r"window left must be a non-negative int .*got -1"),
    "window_float": ({"window": (1, 2.5)}, r"window right must be .*got 2.5"),
    "window_bool": ({"window": (True, None)}, r"window left .*got True"),
    "kv_lengths_negative": ({"kv_lengths": torch.tensor([-1, 3])},
                            r"kv_lengths must lie in \[0, Lk=7\], got \[-1, 3\]"),
    "kv_lengths_too_long": ({"kv_lengths": torch.tensor([8, 3])}, r"kv_lengths .*got \[8, 3\]"),
    "kv_lengths_shape": ({"kv_lengths": torch.tensor([1, 2, 3])},
                         r"kv_lengths must be a \(2,\) integer tensor, got \(3,\)"),
    "kv_lengths_list": ({"kv_lengths": [1, 2]}, r"kv_lengths must be a \(2,\) .*got \[1, 2\]"),
    "kv_lengths_float": ({"kv_lengths": torch.tensor([1.0, 2.0])},
                         r"kv_lengths must be an integer tensor, got torch.float32"),
    "kv_lengths_device": ({"kv_lengths": torch.tensor([1, 2], device="meta")},
                          r"kv_lengths is on meta"),
    "mask_float": ({"mask": torch.ones(LQ, LK)}, r"mask must be a bool tensor .*got torch.float32"),
    "mask_shape": ({"mask": torch.ones(LQ, LK + 1, dtype=torch.bool)},
                   r"mask of shape \(5, 8\) does not broadcast to .*\(2, 4, 5, 7\)"),
    "mask_rank": ({"mask": torch.ones(1, 1, 1, LQ, LK, dtype=torch.bool)},
                  r"mask must have at most 4 dimensions, got shape \(1, 1, 1, 5, 7\)"),
    "bias_int": ({"bias": torch.ones(LQ, LK, dtype=torch.int32)},
                 r"bias must be a floating-point tensor, got torch.int32"),
    "bias_shape": ({"bias": torch.ones(3, HQ, LQ, LK)},
                   r"bias of shape \(3, 4, 5, 7\) does not broadcast"),
    "bias_device": ({"bias": torch.ones(LQ, LK, device="meta")}, r"bias is on meta"),
    "alibi_shape": ({"alibi_slopes": torch.ones(3)},
                    r"alibi_slopes must have shape \(Hq,\)=\(4,\) or \(B, Hq\)=\(2, 4\), "
                    r"got \(3,\)"),
    "alibi_shape_2d": ({"alibi_slopes": torch.ones(HQ, B)}, r"alibi_slopes .*got \(4, 2\)"),
    "alibi_int": ({"alibi_slopes": torch.ones(HQ, dtype=torch.int64)},
                  r"alibi_slopes must be a floating-point tensor .*got torch.int64"),
    "softcap_zero": ({"softcap": 0.0}, r"softcap must be a positive finite number .*got 0.0"),
    "softcap_negative": ({"softcap": -2}, r"softcap .*got -2"),
    "softcap_inf": ({"softcap": float("inf")}, r"softcap .*got inf"),
    "dropout_one": ({"dropout_p": 1.0}, r"dropout_p must be a float in \[0, 1\), got 1.0"),
    "dropout_negative": ({"dropout_p": -0.1}, r"dropout_p .*got -0.1"),
    "scale_nan": ({"scale": float("nan")}, r"scale must be a finite number, got nan"),
    "scale_string": ({"scale": "0.1"}, r"scale must be a finite number, got '0.1'"),
    "causal_int": ({"causal": 1}, r"causal must be a bool, got 1"),
    "return_lse_none": ({"return_lse": None}, r"return_lse must be a bool, got None"),
    "unknown_backend": ({"backend": "nope"}, r"backend must be 'auto' or one of .*got 'nope'"),
    "backend_not_string": ({"backend": None}, r"backend must be a string, got None"),
}


@pytest.mark.parametrize("name", list(OPTION_ERRORS))
def test_option_errors(name):
    kw, match = OPTION_ERRORS[name]
    with pytest.raises(ValueError, match=match):
        qkv.attention(*_qkv(), **kw)


def _packed():
    q, k, v = torch.randn(6, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    return q, k, v


CU = torch.tensor([0, 2, 6], dtype=torch.int32)
CK = torch.tensor([0, 4, 9], dtype=torch.int32)
VARLEN_ERRORS = {
    "q_rank": ((torch.randn(1, 6, 4, 8),) + _packed()[1:] + (CU, CK),
               r"q must be 3-D \(total, H, D\) for attention_varlen, got \(1, 6, 4, 8\)"),
    "not_monotone": (_packed() + (torch.tensor([0, 4, 2, 6], dtype=torch.int32), CK),
                     r"cu_seqlens_q must start at 0, never decrease .*got \[0, 4, 2, 6\]"),
    "wrong_end": (_packed() + (CU, torch.tensor([0, 4, 8], dtype=torch.int32)),
                  r"cu_seqlens_k must .*end at the packed length 9, got \[0, 4, 8\]"),
    "wrong_start": (_packed() + (torch.tensor([1, 2, 6], dtype=torch.int32), CK),
                    r"cu_seqlens_q must start at 0.*got \[1, 2, 6\]"),
    "counts": (_packed() + (torch.tensor([0, 6], dtype=torch.int32), CK),
               r"same number of sequences, got 1 and 2"),
    "float": (_packed() + (CU.float(), CK),
              r"cu_seqlens_q must be int32 or int64, got torch.float32"),
    "rank": (_packed() + (CU, CK[None]),
             r"cu_seqlens_k must be a 1-D \(B\+1,\) int32 or int64 tensor"),
    "empty": (_packed() + (CU, CK[:0]), r"cu_seqlens_k must be a 1-D .*got \(0,\)"),
    "heads": ((torch.randn(6, 3, 8),) + _packed()[1:] + (CU, CK), r"multiple of k/v heads"),
}


@pytest.mark.parametrize("name", list(VARLEN_ERRORS))
def test_varlen_errors(name):
    args, match = VARLEN_ERRORS[name]
    with pytest.raises(ValueError, match=match):
        qkv.attention_varlen(*args)


# A keyword that turns on each feature a backend may declare unsupported.
FEATURE_KEYWORDS = {
    "causal": {"causal": True}, "window": {"window": (2, 2)},
    "kv_lengths": {"kv_lengths": torch.tensor([LK, 3])}, "mask": {"mask": torch.ones(LK) > 0},
    "bias": {"bias": torch.zeros(LK)}, "alibi_slopes": {"alibi_slopes": torch.ones(HQ)},
    "softcap": {"softcap": 2.0}, "dropout_p": {"dropout_p": 0.1},
    "return_lse": {"return_lse": True},
}


@pytest.mark.parametrize(("name", "feature"), [
    (name, feature) for name in BACKENDS for feature in sorted(get(name).unsupported_features)
    if feature in FEATURE_KEYWORDS
])
def test_explicit_backend_lacking_a_feature(name, feature):
    """Each feature a backend declares unsupported is refused, naming the backend and feature."""
    with pytest.raises(NotImplementedError,
                       match=rf"backend {re.escape(repr(name))} does not support {feature}"):
        qkv.attention(*_qkv(), backend=name, **FEATURE_KEYWORDS[feature])


@pytest.mark.parametrize("name", [n for n in BACKENDS if torch.float64 not in get(n).dtypes])
def test_explicit_backend_lacking_a_dtype(name):
    with pytest.raises(NotImplementedError, match=rf"{re.escape(repr(name))}.*torch.float64"):
        qkv.attention(*_qkv(torch.float64), backend=name)


def test_attention_weights_errors():
    q, k, _ = _qkv()
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'dropout_p'"):
        qkv.attention_weights(q, k, dropout_p=0.1)
    with pytest.raises(ValueError, match=r"k must be 4-D .*got 2-D"):
        qkv.attention_weights(q, torch.randn(LK, D))
    with pytest.raises(ValueError, match=r"k head dim must equal q's"):
        qkv.attention_weights(q, torch.randn(B, HK, LK, D + 2))
