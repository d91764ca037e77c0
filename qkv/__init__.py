"""qkv: exact attention in linear memory, and the Transformer built on it.

    import qkv
    out = qkv.attention(q, k, v, causal=True)   # the function (see qkv.attention.attention)

The public names load on first use, so that `import qkv` (and `qkv --help`) does not import
torch. `qkv.attention` is both a subpackage and its function: the package attribute is always
the function, and `from qkv.attention import X` reads the subpackage as usual.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

__all__ = ["attention", "attention_varlen", "attention_weights", "backends", "embed",
           "__version__"]

_LAZY = {"attention": "qkv.attention", "attention_varlen": "qkv.attention",
         "attention_weights": "qkv.attention", "backends": "qkv.attention",
         "embed": "qkv.interop.minilm"}


class _Package(types.ModuleType):
    """The qkv module: loading the subpackage qkv.attention, which would bind the attribute
    `attention` to that module, binds it to the function instead."""

    def __setattr__(self, name: str, value) -> None:
        if name == "attention" and isinstance(value, types.ModuleType):
            value = value.attention
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qkv' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
