"""A shim for Triton's CPU interpreter (TRITON_INTERPRET=1) under NumPy >= 2.4.

The interpreter holds every scalar as a one-element 1-D array and converts it with `int(array)`
when a scalar bounds a `range` loop. NumPy 2.4 refuses `int()` of an array with ndim > 0, so any
kernel whose loop bounds are computed at run time fails there. The shim makes `__index__` read
the single element. `qkv.attention.triton` applies it once, on import, when TRITON_INTERPRET=1;
real GPU runs never touch it.
"""

from __future__ import annotations

_APPLIED = False


def apply() -> None:
    """Patch the interpreter's tensor `__index__` once; a no-op when already done."""
    global _APPLIED
    if _APPLIED:
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    _APPLIED = True
