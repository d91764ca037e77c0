"""qkv: exact attention in linear memory, and the Transformer built on it."""

from qkv.attention import attention, attention_varlen, attention_weights, backends

__version__ = "0.1.0"

__all__ = ["attention", "attention_varlen", "attention_weights", "backends", "__version__"]
