"""qkv: exact attention in linear memory, and the Transformer built on it."""

from qkv.attention import attention, attention_varlen, attention_weights, backends

__version__ = "0.1.0"

__all__ = ["attention", "attention_varlen", "attention_weights", "backends", "embed",
           "__version__"]

_LAZY = {"embed": "qkv.interop.minilm"}  # heavy imports, loaded on first use


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qkv' has no attribute {name!r}")
