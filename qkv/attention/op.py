"""`qkv.attention` as `torch.library` custom ops, so `torch.compile` traces it without a break.

Two ops, each with a fake (meta) implementation and joined by `register_autograd`:

    qkv::attention_forward(q, k, v, <call>, backend) -> (out, lse)
    qkv::attention_backward(dout, dlse, q, k, v, out, lse, <call>, backend, bias_grad)
        -> (dq, dk, dv, dbias)

out (B, Hq, Lq, Dv) in q's dtype and lse (B, Hq, Lq), float32 (float64 for float64 q), both
contiguous; dq, dk, dv contiguous in the shapes and dtypes of q, k, v; dbias in the shape and
dtype of the (4-D) bias when `bias_grad`, else an empty tensor. A backend without an lse
(sdpa, but for torch's plain CPU flash case) gives an lse of zeros (a placeholder NaN would
fail the compiler's output checks), which `qkv.attention` never hands out: such a backend
only takes calls without `return_lse`, and its backward ignores dlse.

`<call>` is an `AttentionCall` in schema types, encoded and decoded in one place (`encode`,
`decode`): optional tensors stay optional tensors, a window side that is None is NO_WINDOW, a
softcap of None is NO_SOFTCAP, and the dropout seed travels as a 0-dim int64 tensor.

The backend is chosen in Python (`qkv.attention`'s `auto` policy, on the tensors' device)
before the op and passed by name. The op's default kernel (CPU and any device) runs that
backend; the CUDA kernel, registered with `register_kernel("cuda")`, runs it with the tensors'
device current, where the triton backend's kernels launch. Those are called directly, without
their autograd.Function: forward, and the deterministic backward from the saved lse (on CUDA;
on the CPU only under TRITON_INTERPRET=1, which is how the tests run them). Nothing imports
triton before a call on the triton backend. The chunked backward also starts from
the saved lse, and so does sdpa in torch's plain CPU flash case (no mask, no bias, MHA),
through torch's own kernels; any other call (reference, the rest of sdpa, registered
backends) recomputes its forward under `torch.func.vjp` in the backward. Saving the folded
lse, where eager chunked keeps the row max and normaliser apart (see chunked.py), gives
float32 gradients a relative error of about 6e-8·|lse|: 6e-5 at scores near 1e3.

`qkv.attention` goes through these ops only while `torch.compile` traces it
(`torch.compiler.is_compiling()`): an eager call through the dispatcher costs 25 us (70 us
with autograd), as much as a whole small attention call. `attention_op` runs the op path
eagerly (tests, opcheck).

Dropout: the seed is drawn from torch's default generator as a tensor, so it is traced and
saved for the backward. Compiled, the draw is the compiler's own random stream: the same
torch.manual_seed gives a different (still reproducible) mask than eager unless
`torch._inductor.config.fallback_random` is set.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from qkv.attention import chunked, sdpa
from qkv.attention import registry as _registry
from qkv.attention.reference import compute_dtype
from qkv.attention.spec import AttentionCall, check_kv_lengths_range

NO_WINDOW = -1  # a window side that is None (unbounded); real sides are >= 0
NO_SOFTCAP = 0.0  # softcap None; a real softcap is > 0
BIAS_INPUT = 6  # position of `bias` among the forward op's inputs


def encode(call: AttentionCall) -> tuple:
    """The forward op's arguments after q, k, v (and before `backend`), in schema order."""
    left, right = call.window if call.window is not None else (None, None)
    seed = call.dropout_seed
    if seed is not None and not isinstance(seed, Tensor):
        seed = torch.tensor(seed, dtype=torch.int64)
    return (call.kv_lengths, call.q_offset, call.mask, call.bias, call.alibi_slopes, seed,
            call.causal, NO_WINDOW if left is None else left,
            NO_WINDOW if right is None else right, call.scale,
            NO_SOFTCAP if call.softcap is None else call.softcap, call.dropout_p)


def decode(q: Tensor, k: Tensor, v: Tensor, kv_lengths, q_offset, mask, bias, alibi_slopes,
           dropout_seed, causal, window_left, window_right, scale, softcap, dropout_p
           ) -> AttentionCall:
    """The `AttentionCall` that `encode` turned into the op's arguments (return_lse False)."""
    left = None if window_left == NO_WINDOW else window_left
    right = None if window_right == NO_WINDOW else window_right
    B, Hq, Lq, D = q.shape
    return AttentionCall(
        B=B, Hq=Hq, Hk=k.shape[1], Lq=Lq, Lk=k.shape[2], D=D, Dv=v.shape[3], scale=scale,
        causal=causal, window=None if left is None and right is None else (left, right),
        kv_lengths=kv_lengths, q_offset=q_offset, mask=mask, bias=bias,
        alibi_slopes=alibi_slopes, softcap=None if softcap == NO_SOFTCAP else softcap,
        dropout_p=dropout_p, dropout_seed=None if dropout_seed is None else int(dropout_seed),
        varlen=q_offset is not None,
    )


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# ---- forward ---------------------------------------------------------------------------------

def _attention_forward(
    q: Tensor, k: Tensor, v: Tensor, kv_lengths: Tensor | None, q_offset: Tensor | None,
    mask: Tensor | None, bias: Tensor | None, alibi_slopes: Tensor | None,
    dropout_seed: Tensor | None, causal: bool, window_left: int, window_right: int,
    scale: float, softcap: float, dropout_p: float, backend: str,
) -> tuple[Tensor, Tensor]:
    """(out, lse) of one call on the named backend: the default kernel, and CUDA's (below)."""
    call = _decode_checked(q, k, v, kv_lengths, q_offset, mask, bias, alibi_slopes,
                           dropout_seed, causal, window_left, window_right, scale, softcap,
                           dropout_p)
    if backend == "triton":
        forward = triton_forward
    elif backend == "sdpa" and _flash_cpu(call, q):
        forward = _flash_cpu_forward
    else:
        forward = _registry.get(backend).forward
    return _finish_forward(*forward(q, k, v, call), q)


attention_forward = torch.library.custom_op("qkv::attention_forward", _attention_forward,
                                            mutates_args=())


def _decode_checked(q, k, v, kv_lengths, *rest) -> AttentionCall:
    """`decode`, with the value check of kv_lengths that tracing leaves out (spec.py)."""
    if kv_lengths is not None:
        check_kv_lengths_range(kv_lengths, k.shape[2])
    return decode(q, k, v, kv_lengths, *rest)


def _finish_forward(out: Tensor, lse: Tensor | None, q: Tensor) -> tuple[Tensor, Tensor]:
    """Contiguous outputs, as the fake implementation promises; zeros where no lse exists."""
    B, Hq, Lq, _ = q.shape
    if lse is None:
        lse = torch.zeros((B, Hq, Lq), dtype=_lse_dtype(q), device=q.device)
    return out.to(q.dtype).contiguous(), lse.to(_lse_dtype(q)).contiguous()


@attention_forward.register_fake
def _attention_forward_fake(q, k, v, *rest):
    B, Hq, Lq, _ = q.shape
    return (q.new_empty(B, Hq, Lq, v.shape[3]),
            q.new_empty(B, Hq, Lq, dtype=_lse_dtype(q)))


# ---- backward --------------------------------------------------------------------------------

def _attention_backward(
    dout: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
    lse: Tensor, kv_lengths: Tensor | None, q_offset: Tensor | None, mask: Tensor | None,
    bias: Tensor | None, alibi_slopes: Tensor | None, dropout_seed: Tensor | None,
    causal: bool, window_left: int, window_right: int, scale: float, softcap: float,
    dropout_p: float, backend: str, bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dbias or an empty tensor) of one call: default kernel and CUDA's.

    chunked and triton run their backward from the saved lse; other backends recompute."""
    call = decode(q, k, v, kv_lengths, q_offset, mask, bias, alibi_slopes, dropout_seed,
                  causal, window_left, window_right, scale, softcap, dropout_p)
    if backend == "triton":
        grads = triton_backward(q, k, v, out, lse, dout, dlse, call, bias_grad)
    elif backend == "sdpa" and _flash_cpu(call, q):
        grads = (*torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q, k, v, out, lse, 0.0, sdpa.torch_is_causal(call),
            scale=call.scale), None)
    elif backend == "chunked":
        m = lse.to(compute_dtype(q.dtype))
        grads = chunked.chunked_backward(q, k, v, out, m, torch.zeros_like(m), dout, dlse, call,
                                         chunked.BLOCK_M, chunked.BLOCK_N, bias_grad)
    else:
        grads = _recomputed_grads(_registry.get(backend), q, k, v, call, dout, dlse, bias_grad)
    return _finish_backward(*grads, q, k, v, bias)


attention_backward = torch.library.custom_op("qkv::attention_backward", _attention_backward,
                                             mutates_args=())


def _flash_cpu(call: AttentionCall, q: Tensor) -> bool:
    """Whether the sdpa backend's call is torch's plain CPU flash case (no mask of any kind,
    no bias, a K/V head per query head), whose kernels return the lse and take it back in the
    backward, so the backward need not recompute."""
    return (q.device.type == "cpu" and not sdpa.needs_explicit_mask(call)
            and call.bias is None and call.alibi_slopes is None and call.Hq == call.Hk
            and call.Lq > 0 and call.Lk > 0)


def _flash_cpu_forward(q, k, v, call: AttentionCall):
    """torch's CPU flash forward, the kernel F.scaled_dot_product_attention runs for the call."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, sdpa.torch_is_causal(call), scale=call.scale)


def _recomputed_grads(backend, q, k, v, call: AttentionCall, dout, dlse, bias_grad: bool):
    """Gradients by running the backend's forward again under `torch.func.vjp` (an op's kernel
    runs below autograd, where plain autograd would record nothing)."""
    def run(*inputs):
        c = replace(call, bias=inputs[3]) if bias_grad else call
        return tuple(t for t in backend.forward(*inputs[:3], c) if t is not None)  # no lse: out

    inputs = (q, k, v, call.bias) if bias_grad else (q, k, v)
    outputs, pullback = torch.func.vjp(run, *inputs)
    cotangents = (dout,)
    if len(outputs) == 2:
        lse = outputs[1]
        cotangents += (torch.zeros_like(lse) if dlse is None else dlse.to(lse.dtype),)
    grads = pullback(cotangents)
    return (*grads[:3], grads[3] if bias_grad else None)


def _finish_backward(dq, dk, dv, dbias, q, k, v, bias):
    """Contiguous gradients in the inputs' dtypes; an empty dbias where none is wanted."""
    grads = [g.to(t.dtype).contiguous() for g, t in ((dq, q), (dk, k), (dv, v))]
    if dbias is None:
        return (*grads, q.new_empty(0))
    return (*grads, dbias.to(bias.dtype).contiguous())


@attention_backward.register_fake
def _attention_backward_fake(dout, dlse, q, k, v, out, lse, kv_lengths, q_offset, mask, bias,
                             *rest):
    bias_grad = rest[-1]
    dbias = bias.new_empty(bias.shape) if bias_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


# ---- autograd --------------------------------------------------------------------------------

N_CALL_TENSORS = 6  # kv_lengths, q_offset, mask, bias, alibi_slopes, dropout_seed


def _setup_context(ctx, inputs, output):
    q, k, v, *call_args, backend = inputs
    ctx.flags, ctx.backend = call_args[N_CALL_TENSORS:], backend
    ctx.save_for_backward(q, k, v, *output, *call_args[:N_CALL_TENSORS])


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    bias_grad = tensors[3] is not None and ctx.needs_input_grad[BIAS_INPUT]
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dbias = attention_backward(dout, dlse, q, k, v, out, lse, *tensors, *ctx.flags,
                                           ctx.backend, bias_grad)
    # One gradient per input: q, k, v, the six call tensors (bias only), the flags, backend.
    return (dq, dk, dv, None, None, None, dbias if bias_grad else None, None, None,
            *([None] * len(ctx.flags)), None)


attention_forward.register_autograd(_backward, setup_context=_setup_context)


# ---- entry -----------------------------------------------------------------------------------

def attention_op(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall, backend: str):
    """(out, lse) of a checked call on the named backend, through the custom op."""
    return attention_forward(q, k, v, *encode(call), backend)


# ---- CUDA ------------------------------------------------------------------------------------

def _with_device_of_inputs(kernel):
    """`kernel` with the first input's CUDA device current: triton launches its kernels on the
    current device, which need not hold the tensors (a model on cuda:1)."""
    def cuda_kernel(*args, **kwargs):
        with torch.cuda.device(args[0].device):
            return kernel(*args, **kwargs)

    return cuda_kernel


attention_forward.register_kernel("cuda", _with_device_of_inputs(_attention_forward))
attention_backward.register_kernel("cuda", _with_device_of_inputs(_attention_backward))


# ---- triton (CUDA) ---------------------------------------------------------------------------

def _triton_layout(*tensors: Tensor) -> list[Tensor]:
    """Last dim contiguous, as the kernels read rows; float32 for bfloat16 under the
    interpreter, which multiplies bf16 tiles as raw bits."""
    from qkv.attention.triton.function import _last_dim_contiguous
    from qkv.attention.triton.launch import interpreting

    widen = interpreting() and tensors[0].dtype == torch.bfloat16
    return [_last_dim_contiguous(t.float() if widen else t) for t in tensors]


def triton_forward(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall):
    """The triton forward kernels: (out, lse float32), lse = (m + log2 l) · ln 2."""
    from qkv.attention.triton.function import forward, make_problem

    q, k, v = _triton_layout(q, k, v)
    out, m, l2 = forward(q, k, v, make_problem(call, q))
    return out, (m + l2) * math.log(2.0)


def triton_backward(q, k, v, out, lse, dout, dlse, call: AttentionCall, bias_grad: bool):
    """The triton backward kernels from the saved lse: (dq, dk, dv, dbias or None).

    They take the row statistics in the log2 domain as (m, log2 l); (lse · log2 e, 0) is the
    same statistic folded into one (an empty row keeps m = -inf)."""
    from qkv.attention.triton.function import make_problem
    from qkv.attention.triton.kernels_bwd import backward

    q, k, v, out, dout = _triton_layout(q, k, v, out, dout.to(out.dtype))
    prob = replace(make_problem(call, q), bias_grad=bias_grad)
    m2 = (lse.to(torch.float32) * math.log2(math.e)).contiguous()
    return backward(q, k, v, out.contiguous(), m2, torch.zeros_like(m2), dout, dlse, prob)
