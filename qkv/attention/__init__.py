"""`qkv.attention`: exact attention behind one function, on several backends."""

import importlib.util
import os

from qkv.attention import chunked, reference, sdpa
from qkv.attention.api import attention, attention_weights
from qkv.attention.flops import attention_flops
from qkv.attention.registry import Backend, backends, register
from qkv.attention.varlen import attention_varlen

register(Backend("reference", reference.forward))
register(Backend("chunked", chunked.forward))
register(Backend("sdpa", sdpa.forward, unsupported_features=sdpa.UNSUPPORTED,
                 prefers_fn=sdpa.prefers))
if os.environ.get("QKV_DISABLE_TRITON") != "1" and importlib.util.find_spec("triton"):
    from qkv.attention import triton as _triton  # noqa: F401  (registers the triton backend)

__all__ = [
    "Backend",
    "attention",
    "attention_flops",
    "attention_varlen",
    "attention_weights",
    "backends",
    "register",
]
