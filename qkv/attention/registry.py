"""The backend registry and the `auto` policy.

A backend is registered with one call to `register(Backend(...))`; the conformance suite runs
every registered backend that is usable on the CPU against the reference.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qkv.attention import chunked, reference, sdpa
from qkv.attention.spec import FLOAT_DTYPES, AttentionCall

ForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionCall], tuple]


@dataclass(frozen=True)
class Backend:
    """One way of computing `qkv.attention`.

    forward(q, k, v, call) returns (out, lse or None).
    unsupported(call, q) names the first feature this backend lacks for the call, or None.
    forward_varlen, when set, takes packed tensors directly (see `attention_varlen`).
    """

    name: str
    forward: ForwardFn
    device_types: tuple[str, ...] | None = None  # None: any device
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    unsupported_fn: Callable[[AttentionCall, torch.Tensor], str | None] = lambda call, q: None
    available_fn: Callable[[], bool] = lambda: True
    forward_varlen: Callable | None = field(default=None)

    def usable_on(self, device: torch.device) -> bool:
        if self.device_types is not None and device.type not in self.device_types:
            return False
        return self.available_fn()

    def unsupported(self, call: AttentionCall, q: torch.Tensor) -> str | None:
        if not self.usable_on(q.device):
            return f"device {q.device}"
        if q.dtype not in self.dtypes:
            return f"dtype {q.dtype}"
        return self.unsupported_fn(call, q)


_REGISTRY: dict[str, Backend] = {}
# Preference of `auto` per device type, fastest first (see benchmarks/RESULTS.md).
_AUTO_ORDER: dict[str, list[str]] = {}


def register(backend: Backend, *, auto_rank: dict[str, int] | None = None) -> Backend:
    """Add a backend; `auto_rank` maps device type -> position in that device's auto order."""
    _REGISTRY[backend.name] = backend
    for device_type, rank in (auto_rank or {}).items():
        order = _AUTO_ORDER.setdefault(device_type, [])
        if backend.name in order:
            order.remove(backend.name)
        order.insert(rank, backend.name)
    return backend


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {sorted(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def names() -> list[str]:
    """Every registered backend name."""
    return list(_REGISTRY)


def backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable on `device` (default: CUDA if present, else CPU), fastest first."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    order = _AUTO_ORDER.get(device.type, [])
    ranked = [n for n in order if _REGISTRY[n].usable_on(device)]
    rest = [n for n, b in _REGISTRY.items() if n not in ranked and b.usable_on(device)]
    return ranked + rest


# Largest Lq * Lk for which `auto` lets torch SDPA take a call that needs an explicit mask on
# the CPU. Measured (benchmarks/RESULTS.md, "auto policy"): with a materialised mask SDPA wins
# up to about 512 x 512 (decode over any cache, padded batches of short sentences); beyond
# that chunked wins, since it skips masked blocks and never builds the (Lq x Lk) mask.
CPU_SDPA_MASKED_MAX_SCORES = 512 * 512


def _sdpa_preferred(call: AttentionCall, q: torch.Tensor) -> bool:
    """Whether `auto` should hand this call to torch SDPA rather than chunked."""
    if q.dtype == torch.float64:  # torch runs float64 on its O(n^2) math path
        return False
    if q.device.type != "cpu":
        return True
    masked = sdpa._needs_explicit_mask(call) or call.bias is not None or (
        call.alibi_slopes is not None)
    return not masked or call.Lq * call.Lk <= CPU_SDPA_MASKED_MAX_SCORES or call.Lq == 1


def choose(call: AttentionCall, q: torch.Tensor, backend: str) -> Backend:
    """Resolve the `backend` argument for one call; raise NotImplementedError if impossible."""
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a string, got {backend!r}")
    if backend != "auto":
        chosen = get(backend)
        reason = chosen.unsupported(call, q)
        if reason is not None:
            raise NotImplementedError(f"backend {chosen.name!r} does not support {reason}")
        return chosen
    reasons = []
    for name in backends(q.device):
        candidate = _REGISTRY[name]
        reason = candidate.unsupported(call, q)
        if reason is None and name == "sdpa" and not _sdpa_preferred(call, q):
            reason = "not preferred for this call"
        if reason is None:
            return candidate
        reasons.append(f"{name}: {reason}")
    raise NotImplementedError("no backend supports this call: " + "; ".join(reasons))


register(Backend("reference", reference.forward), auto_rank={"cpu": 0, "cuda": 0})
register(Backend("chunked", chunked.forward), auto_rank={"cpu": 0, "cuda": 0})
register(
    Backend("sdpa", sdpa.forward, unsupported_fn=lambda call, q: sdpa.unsupported(call)),
    auto_rank={"cpu": 0, "cuda": 0},
)

_WANT_TRITON = os.environ.get("QKV_DISABLE_TRITON") != "1"
_HAVE_TRITON = importlib.util.find_spec("triton") is not None
if _WANT_TRITON and _HAVE_TRITON and (Path(__file__).parent / "triton" / "__init__.py").exists():
    from qkv.attention import triton as _triton  # noqa: F401  (registers the triton backend)
