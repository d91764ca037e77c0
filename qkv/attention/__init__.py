"""`qkv.attention`: exact attention behind one function, on several backends."""

from qkv.attention.api import attention, attention_varlen, attention_weights
from qkv.attention.flops import attention_flops
from qkv.attention.registry import Backend, backends, register

__all__ = [
    "Backend",
    "attention",
    "attention_flops",
    "attention_varlen",
    "attention_weights",
    "backends",
    "register",
]
