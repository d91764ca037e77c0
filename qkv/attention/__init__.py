"""`qkv.attention`: exact attention behind one function, on several backends."""

from qkv.attention.api import attention, attention_varlen, attention_weights
from qkv.attention.backends import Backend, backends, register
from qkv.attention.flops import attention_flops

__all__ = [
    "Backend",
    "attention",
    "attention_flops",
    "attention_varlen",
    "attention_weights",
    "backends",
    "register",
]
