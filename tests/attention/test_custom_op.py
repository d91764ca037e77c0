"""The torch.library custom ops behind `qkv.attention` under torch.compile (qkv/attention/op.py).

The op path is checked three ways: `torch.library.opcheck` over a representative set of calls
(schema, fake tensors, autograd registration, AOT dispatch with dynamic shapes), the op run
eagerly against the direct backend call (outputs, lse and gradients in float64), and
`qkv.attention` compiled with fullgraph=True (a graph break fails the test) against eager.
Compiled functions are built once per module: compiling is the slow part on a small CPU.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import qkv
from qkv.attention import op
from qkv.attention.spec import AttentionCall, check_call

registry = importlib.import_module("qkv.attention.registry")


B, HQ, HK, LQ, LK, D, DV = 2, 4, 2, 5, 7, 8, 6


def _inputs(dtype=torch.float64, lq=LQ, lk=LK, hk=HK, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, lq, D, generator=g, dtype=dtype)
    k = torch.randn(B, hk, lk, D, generator=g, dtype=dtype)
    v = torch.randn(B, hk, lk, DV, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def _extras(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        "mask": torch.rand(B, 1, LQ, LK, generator=g) > 0.3,
        "bias": torch.randn(1, HQ, LQ, LK, generator=g, dtype=torch.float64),
        "alibi_slopes": torch.rand(HQ, generator=g, dtype=torch.float64),
    }


# name -> (keywords, backends the call is checked on)
CASES = {
    "plain": ({}, ("reference", "chunked", "sdpa")),
    "causal": ({"causal": True}, ("reference", "chunked", "sdpa")),
    "mask": ({"mask": "mask"}, ("reference", "chunked", "sdpa")),
    "kv_lengths": ({"kv_lengths": torch.tensor([7, 2])}, ("reference", "chunked", "sdpa")),
    "window": ({"window": (2, 1), "causal": False}, ("chunked", "sdpa")),
    "window_left_causal": ({"window": (3, None), "causal": True}, ("chunked",)),
    "lse_grad": ({"return_lse": True, "causal": True}, ("reference", "chunked")),
    "bias_grad": ({"bias": "bias", "return_lse": True}, ("reference", "chunked")),
    "alibi_softcap": ({"alibi_slopes": "alibi_slopes", "softcap": 2.0, "return_lse": True},
                      ("reference", "chunked")),
    "dropout": ({"dropout_p": 0.3, "causal": True}, ("reference", "chunked")),
    "empty_rows": ({"kv_lengths": torch.tensor([0, 3]), "return_lse": True},
                   ("reference", "chunked")),
    # Several features in one call, for the default suite's opcheck.
    "mask_lengths_window_lse": ({"mask": "mask", "kv_lengths": torch.tensor([7, 4]),
                                 "window": (3, 1), "causal": True, "return_lse": True},
                                ("chunked",)),
    "bias_alibi_softcap_lse": ({"bias": "bias", "alibi_slopes": "alibi_slopes",
                                "softcap": 2.0, "return_lse": True, "causal": True},
                               ("reference",)),
}
GQA_CASES = ("plain", "causal", "kv_lengths", "lse_grad")


def _keywords(name: str, bias_grad: bool = False) -> dict:
    """The case's keywords, named extras filled in; a fresh bias that requires grad."""
    extras = _extras()
    kw = {k: extras[v] if isinstance(v, str) and v in extras else v
          for k, v in CASES[name][0].items()}
    if "bias" in kw and bias_grad:
        kw["bias"] = kw["bias"].clone().requires_grad_()
    return kw


def _op_args(q, k, v, keywords: dict, backend: str) -> tuple:
    call = check_call(q, k, v, **keywords)
    return (q, k, v, *op.encode(call), backend)


PAIRS = [(name, backend) for name, (_, backends) in CASES.items() for backend in backends]


# ---- encoding --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_encode_decode_round_trip(name):
    q, k, v = _inputs()
    call = check_call(q, k, v, **_keywords(name))
    back = op.decode(q, k, v, *op.encode(call))
    assert isinstance(back, AttentionCall)
    for field in ("B", "Hq", "Hk", "Lq", "Lk", "D", "Dv", "scale", "causal", "window",
                  "softcap", "dropout_p", "dropout_seed", "q_offset"):
        assert getattr(back, field) == getattr(call, field), field
    for field in ("kv_lengths", "mask", "bias", "alibi_slopes"):
        assert getattr(back, field) is getattr(call, field), field


def test_window_sides_and_softcap_use_sentinels():
    q, k, v = _inputs()
    for window in ((0, None), (None, 0), (4, 2)):
        call = check_call(q, k, v, window=window)
        assert op.decode(q, k, v, *op.encode(call)).window == window
    call = check_call(q, k, v, window=(None, None))
    assert call.window is None and op.decode(q, k, v, *op.encode(call)).window is None
    assert op.encode(check_call(q, k, v))[10] == op.NO_SOFTCAP


# ---- opcheck ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, backend", PAIRS)
def test_opcheck(name, backend):
    q, k, v = _inputs()
    args = _op_args(q, k, v, _keywords(name, bias_grad=True), backend)
    torch.library.opcheck(op.attention_forward, args)


@pytest.mark.parametrize("name", GQA_CASES)
def test_opcheck_gqa_and_lq_past_lk(name):
    q, k, v = _inputs(lq=6, lk=4, hk=1)  # multi-query, more queries than keys
    kw = dict(_keywords(name))
    if "kv_lengths" in kw:
        kw["kv_lengths"] = torch.tensor([4, 1])
    torch.library.opcheck(op.attention_forward, _op_args(q, k, v, kw, "chunked"))


def test_opcheck_backward_op():
    q, k, v = _inputs()
    kw = _keywords("bias_grad", bias_grad=True)
    args = _op_args(q, k, v, kw, "chunked")
    out, lse = op.attention_forward(*args)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    tail = args[3:-1]
    torch.library.opcheck(op.attention_backward,
                          (dout, dlse, q.detach(), k.detach(), v.detach(), out.detach(),
                           lse.detach(), *tail, "chunked", True),
                          test_utils=("test_schema", "test_faketensor"))


# ---- the op path against the direct call -----------------------------------------------------

def _grads(outs, inputs):
    out, lse = outs if isinstance(outs, tuple) else (outs, None)
    g = torch.Generator().manual_seed(7)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    if lse is not None:
        finite = lse.isfinite()
        loss = loss + torch.where(finite, lse, 0.0).sum()
    return torch.autograd.grad(loss, inputs, allow_unused=True)


@pytest.mark.parametrize("name, backend", PAIRS)
def test_op_path_equals_direct_call(name, backend):
    q, k, v = _inputs()
    kw = _keywords(name, bias_grad=True)
    inputs = [q, k, v] + ([kw["bias"]] if "bias" in kw else [])
    torch.manual_seed(3)
    direct = qkv.attention(q, k, v, backend=backend, **kw)
    torch.manual_seed(3)
    call = check_call(q, k, v, **kw)
    out, lse = op.attention_op(q, k, v, call, backend)
    via_op = (out, lse) if call.return_lse else out
    for a, b in zip(_grads(direct, inputs), _grads(via_op, inputs), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    first = direct[0] if call.return_lse else direct
    torch.testing.assert_close(first, out, atol=1e-12, rtol=1e-12)
    if call.return_lse:
        torch.testing.assert_close(direct[1], lse, atol=1e-12, rtol=1e-12)


def test_op_outputs_are_contiguous_like_the_fake():
    # sdpa may hand back a transposed layout for transposed inputs; the op never does.
    x = torch.randn(B, LQ, HQ, D)
    q = k = v = x.transpose(1, 2)
    out, lse = op.attention_op(q, k, v, check_call(q, k, v), "sdpa")
    assert out.is_contiguous() and lse.is_contiguous()
    # torch's plain CPU flash case returns a true lse; with a mask sdpa has none: zeros.
    _, want = qkv.attention(q, k, v, return_lse=True, backend="reference")
    torch.testing.assert_close(lse, want)
    call = check_call(q, k, v, kv_lengths=torch.tensor([3, 5]))
    out, lse = op.attention_op(q, k, v, call, "sdpa")
    assert out.is_contiguous() and lse.dtype == torch.float32 and not lse.any()


@pytest.mark.skipif("triton" not in registry.backends("cpu"),
                    reason="triton backend not usable on the CPU")
@pytest.mark.parametrize("name", ["causal", "bias_grad", "kv_lengths"])
def test_triton_kernels_through_the_op(name):
    """The triton kernels as the op calls them on CUDA, here under TRITON_INTERPRET=1."""
    q, k, v = _inputs(dtype=torch.float32)
    kw = _keywords(name, bias_grad=True)
    if "bias" in kw:
        kw["bias"] = kw["bias"].detach().float().requires_grad_()
    inputs = [q, k, v] + ([kw["bias"]] if "bias" in kw else [])
    call = check_call(q, k, v, **kw)
    out, lse = op.attention_op(q, k, v, call, "triton")
    kw["return_lse"] = True
    ref_out, ref_lse = qkv.attention(q, k, v, backend="reference", **kw)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)
    for a, b in zip(_grads((out, lse), inputs), _grads((ref_out, ref_lse), inputs),
                    strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif("triton" not in registry.backends("cpu"),
                    reason="triton backend not usable on the CPU")
def test_opcheck_triton_kernels():
    q, k, v = _inputs(dtype=torch.float32)
    kw = dict(_keywords("bias_grad"), causal=True, kv_lengths=torch.tensor([7, 3]))
    kw["bias"] = kw["bias"].float().requires_grad_()
    torch.library.opcheck(op.attention_forward, _op_args(q, k, v, kw, "triton"))


def test_kv_lengths_range_is_checked_by_the_op():
    q, k, v = _inputs()
    call = check_call(q, k, v, kv_lengths=torch.tensor([7, 2]))
    bad = (torch.tensor([7, 9]),) + op.encode(call)[1:]
    with pytest.raises(ValueError, match=r"kv_lengths must lie in \[0, Lk=7\], got \[7, 9\]"):
        op.attention_forward(q, k, v, *bad, "chunked")


# ---- torch.compile ---------------------------------------------------------------------------

def _attend(q, k, v, kv_lengths, mask, bias):
    """Several calls in one graph: GQA with kv_lengths and the lse, a window, a mask, a bias."""
    out, lse = qkv.attention(q, k, v, causal=True, kv_lengths=kv_lengths, return_lse=True)
    windowed = qkv.attention(q, k, v, window=(2, 1), backend="chunked")
    masked = qkv.attention(q, k, v, mask=mask, bias=bias, softcap=3.0, backend="reference")
    auto = qkv.attention(q, k, v, causal=True)  # sdpa
    return out, torch.where(lse.isfinite(), lse, 0.0), windowed, masked, auto


_COMPILED: dict = {}


def _compiled(dynamic: bool):
    if dynamic not in _COMPILED:
        torch._dynamo.reset()
        _COMPILED[dynamic] = torch.compile(_attend, fullgraph=True, dynamic=dynamic,
                                           backend="aot_eager")
    return _COMPILED[dynamic]


def _compile_inputs(lq=LQ, lk=LK, seed=0):
    q, k, v = _inputs(lq=lq, lk=lk, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand(B, 1, lq, lk, generator=g) > 0.3
    bias = torch.randn(1, HQ, lq, lk, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v, torch.tensor([lk, 2]), mask, bias


def _check_compiled_matches_eager(fn, args):
    outs = fn(*args)
    ref = _attend(*args)
    grad_inputs = [args[0], args[1], args[2], args[5]]
    total = sum((o * (i + 1)).sum() for i, o in enumerate(outs))
    ref_total = sum((o * (i + 1)).sum() for i, o in enumerate(ref))
    got = torch.autograd.grad(total, grad_inputs)
    want = torch.autograd.grad(ref_total, grad_inputs)
    for a, b in zip(list(outs) + list(got), list(ref) + list(want), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_compiled_fullgraph_matches_eager():
    _check_compiled_matches_eager(_compiled(False), _compile_inputs())


def test_compiled_dynamic_shapes_match_eager():
    fn = _compiled(True)
    for lq, lk in ((LQ, LK), (3, 9)):
        _check_compiled_matches_eager(fn, _compile_inputs(lq, lk, seed=lq))


def test_compiled_call_goes_through_the_op():
    gm = torch._dynamo.export(_attend)(*_compile_inputs()).graph_module
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert any("qkv.attention_forward" in t for t in targets), targets


def test_compiled_errors_carry_the_eager_messages():
    """A bad call fails while tracing. Without fullgraph the frame falls back to eager and
    raises qkv's ValueError; with fullgraph torch raises its own error, quoting qkv's message.
    kv_lengths values are checked by the op when the graph runs."""
    def bad_heads(q, k, v):
        return qkv.attention(q, k[:, :1].expand(B, 3, LK, D), v[:, :1].expand(B, 3, LK, DV))

    def bad_lengths(q, k, v, kv_lengths):
        return qkv.attention(q, k, v, kv_lengths=kv_lengths)

    q, k, v = _inputs()
    message = r"multiple of k/v heads, got Hq=4 .*Hk=3"
    with pytest.raises(ValueError, match=message):
        torch.compile(bad_heads, backend="eager")(q, k, v)
    with pytest.raises(Exception, match=message):
        torch.compile(bad_heads, fullgraph=True, backend="eager")(q, k, v)
    with pytest.raises(ValueError, match=r"kv_lengths must lie in \[0, Lk=7\], got \[8, 2\]"):
        torch.compile(bad_lengths, fullgraph=True, backend="aot_eager")(
            q, k, v, torch.tensor([8, 2]))


def test_compiled_dropout_is_reproducible_and_matches_eager_with_eager_random():
    """Dropout: the seed is drawn inside the graph and saved for the backward. With the
    compiler's random numbers taken from eager (fallback_random), the mask is eager's."""
    import torch._inductor.config as inductor_config

    def drop(q, k, v):
        return qkv.attention(q, k, v, dropout_p=0.4, causal=True, backend="chunked")

    q, k, v = _inputs()
    with inductor_config.patch(fallback_random=True):
        fn = torch.compile(drop, fullgraph=True, backend="aot_eager")
        torch.manual_seed(5)
        out = fn(q, k, v)
        got = torch.autograd.grad(out.sum(), (q, k, v))
    torch.manual_seed(5)
    ref = drop(q, k, v)
    want = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip([out, *got], [ref, *want], strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.slow
def test_inductor_compiled_matches_eager():
    """The default backend (inductor) generates code around the op: slow to compile here."""
    torch._dynamo.reset()
    fn = torch.compile(_attend, fullgraph=True, dynamic=True)
    for lq, lk in ((LQ, LK), (3, 9)):
        _check_compiled_matches_eager(fn, _compile_inputs(lq, lk, seed=lq))
