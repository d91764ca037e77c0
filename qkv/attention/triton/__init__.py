"""The triton backend: fused FlashAttention-2 style kernels (forward, backward, split-KV decode).

Registered for CUDA, where `auto` ranks it first. Under TRITON_INTERPRET=1 it also runs on the
CPU as a correctness target for the tests, but `auto` never picks it there.
"""

from __future__ import annotations

import torch

from qkv.attention.registry import Backend, register
from qkv.attention.spec import AttentionCall
from qkv.attention.triton import interpreter_compat
from qkv.attention.triton.function import MAX_HEAD_DIM, attention, attention_varlen
from qkv.attention.triton.launch import interpreting

if interpreting():
    interpreter_compat.apply()

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported(call: AttentionCall, q: torch.Tensor) -> str | None:
    """The first feature of `call` this backend lacks, or None."""
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} (the triton kernels take float16, bfloat16 and float32)"
    if max(call.D, call.Dv) > MAX_HEAD_DIM:
        return f"head dim D={call.D}, Dv={call.Dv} (at most {MAX_HEAD_DIM})"
    return None


def _available() -> bool:
    return torch.cuda.is_available() or interpreting()


BACKEND = register(
    Backend(
        "triton",
        attention,
        device_types=("cuda", "cpu") if interpreting() else ("cuda",),
        dtypes=DTYPES,
        unsupported_fn=unsupported,
        available_fn=_available,
        forward_varlen=attention_varlen,
    )
)

__all__ = ["BACKEND", "unsupported"]
