"""`qkv.attention_varlen` under torch.compile(fullgraph=True): no graph break, eager's numbers.

Compiled, packed rows go through the custom op as one row with a block-diagonal mask built by
tensor ops (varlen.py, `_traced`); these tests compare that with the eager path in float64:
outputs, lse and the gradients of q, k and v. fullgraph=True turns a graph break into an
error. The backend is aot_eager (the forward and backward graphs, without inductor's code
generation); each compiled function is built once per module.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import qkv
from qkv.attention.varlen import checked_cu_seqlens

HQ, HK, D, DV = 4, 2, 8, 7
SELF = ([3, 1, 5, 2], [3, 1, 5, 2])  # (query lengths, key lengths) of each sequence
# Keys longer and shorter than the queries (bottom-right alignment), and a sequence whose
# queries see no key at all (zeros, lse -inf).
CROSS = ([2, 1, 4, 3, 2], [4, 1, 3, 5, 0])


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _inputs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lengths[0]), sum(lengths[1])
    q = torch.randn(tq, HQ, D, generator=g, dtype=torch.float64)
    k = torch.randn(tk, HK, D, generator=g, dtype=torch.float64)
    v = torch.randn(tk, HK, DV, generator=g, dtype=torch.float64)
    slopes = torch.rand(len(lengths[0]), HQ, generator=g, dtype=torch.float64)
    return [t.requires_grad_() for t in (q, k, v)] + [_cu(lengths[0]), _cu(lengths[1]), slopes]


def _finite(lse):
    return torch.where(lse.isfinite(), lse, 0.0)


def _attend(q, k, v, cu_q, cu_k, slopes):
    """Several packed calls in one graph: causal with the lse (GQA), a two-sided window with
    softcap and scale on the reference, ALiBi per sequence with a left window, and no mask."""
    out, lse = qkv.attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    windowed = qkv.attention_varlen(q, k, v, cu_q, cu_k, window=(2, 1), softcap=3.0, scale=0.4,
                                    backend="reference")
    alibi, alibi_lse = qkv.attention_varlen(q, k, v, cu_q, cu_k, alibi_slopes=slopes,
                                            causal=True, window=(3, None), return_lse=True)
    plain = qkv.attention_varlen(q, k, v, cu_q, cu_k, alibi_slopes=slopes[0])
    return out, _finite(lse), windowed, alibi, _finite(alibi_lse), plain


_COMPILED: dict = {}


def _compiled(dynamic: bool):
    """(compiled _attend, its frame counter), built once per module."""
    if dynamic not in _COMPILED:
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        fn = torch.compile(_attend, fullgraph=True, dynamic=dynamic, backend=counter)
        _COMPILED[dynamic] = fn, counter
    return _COMPILED[dynamic]


def _assert_matches_eager(fn, args, reference=_attend):
    outs, ref = fn(*args), reference(*args)
    g = torch.Generator().manual_seed(9)
    weights = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in ref]
    grads = [torch.autograd.grad(sum((o * w).sum() for o, w in zip(res, weights, strict=True)),
                                 args[:3])
             for res in (outs, ref)]
    for a, b in zip([*outs, *grads[0]], [*ref, *grads[1]], strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("lengths", [SELF, CROSS], ids=["self", "cross"])
def test_compiled_fullgraph_matches_eager(lengths):
    fn, _ = _compiled(False)
    _assert_matches_eager(fn, _inputs(lengths))


def test_compiled_dynamic_matches_eager_with_one_graph():
    """New lengths, new numbers of sequences and new totals reuse the one dynamic graph.

    The first call's sizes (Tq, Tk, B, B+1, heads, head dims) are all different: equal sizes
    would be taken as one symbol (torch's duck sizing) and a later call would recompile."""
    fn, counter = _compiled(True)
    frames = []
    for seed, lengths in enumerate((CROSS, SELF, ([6, 1, 2], [6, 1, 2]), ([1, 1], [2, 3]))):
        _assert_matches_eager(fn, _inputs(lengths, seed=seed))
        frames.append(counter.frame_count)
    assert frames == frames[:1] * 4  # no recompilation after the first call


def test_compiled_call_has_no_host_read_of_the_offsets():
    """The compiled packed call is the attention op with tensor-built visibility; the offsets
    are checked by their own op when the graph runs."""
    gm = torch._dynamo.export(_attend)(*_inputs(SELF)).graph_module
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert any("qkv.attention_forward" in t for t in targets), targets
    assert any("qkv.checked_cu_seqlens" in t for t in targets), targets


def test_compiled_offsets_are_checked_when_the_graph_runs():
    fn, _ = _compiled(False)
    args = _inputs(SELF)
    args[3] = torch.tensor([0, 3, 2, 9, 11], dtype=torch.int32)  # decreasing
    with pytest.raises(ValueError, match=r"cu_seqlens_q must start at 0, never decrease"):
        fn(*args)


def test_opcheck_of_the_offsets_check():
    for cu in (_cu([3, 1, 5]), _cu([3, 1, 5]).long()):
        torch.library.opcheck(checked_cu_seqlens, (cu, 9, "cu_seqlens_q"))


def test_compiled_dropout_matches_eager_with_eager_random():
    """Dropout takes the padded form, whose (b, h, i, j) are those of eager's mask: with the
    compiler's random numbers taken from eager (fallback_random), the numbers are eager's."""
    import torch._inductor.config as inductor_config

    def drop(q, k, v, cu_q, cu_k, slopes):
        return (qkv.attention_varlen(q, k, v, cu_q, cu_k, dropout_p=0.4, causal=True,
                                     backend="chunked"),)

    args = _inputs(CROSS)
    with inductor_config.patch(fallback_random=True):
        fn = torch.compile(drop, fullgraph=True, backend="aot_eager")
        torch.manual_seed(5)
        got = fn(*args)
    torch.manual_seed(5)
    want = drop(*args)
    _assert_matches_eager(lambda *a: got, args, reference=lambda *a: want)


@pytest.mark.slow
def test_inductor_compiled_matches_eager():
    """The default backend (inductor) generates code around the op: slow to compile here."""
    torch._dynamo.reset()
    fn = torch.compile(_attend, fullgraph=True, dynamic=True)
    for seed, lengths in enumerate((CROSS, SELF)):
        _assert_matches_eager(fn, _inputs(lengths, seed=seed))


# ---- the op's CUDA kernel --------------------------------------------------------------------

def test_cuda_kernels_are_registered():
    """Both ops have a default kernel and a CUDA kernel (where the triton kernels run)."""
    for name in ("qkv::attention_forward", "qkv::attention_backward"):
        for key in ("CompositeExplicitAutograd", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), (name, key)


def test_registering_the_cuda_kernels_imports_no_triton():
    code = ("import sys, torch, qkv.attention.op; "
            "assert torch._C._dispatch_has_kernel_for_dispatch_key("
            "'qkv::attention_forward', 'CUDA'); "
            "assert 'triton' not in sys.modules, 'triton imported'")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["QKV_DISABLE_TRITON"] = "1"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
