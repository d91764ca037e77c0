"""The backend registry and the `auto` policy.

A backend is registered with one call to `register(Backend(...))`; the conformance suite runs
every registered backend that is usable on the CPU against the reference. The built-in
backends are registered by `qkv.attention` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from qkv.attention.spec import FLOAT_DTYPES, AttentionCall
from qkv.device import resolve_device

ForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionCall], tuple]
CallCheck = Callable[[AttentionCall, torch.Tensor], object]


def _always(*_args) -> bool:
    return True


def _no_other_limit(call: AttentionCall, q: torch.Tensor) -> None:
    return None


@dataclass(frozen=True)
class Backend:
    """One way of computing `qkv.attention`.

    forward(q, k, v, call) returns (out, lse or None).
    unsupported_features maps each call feature (`AttentionCall.features()`) the backend cannot
    express to the reason; calls using one are refused with NotImplementedError naming it.
    unsupported_fn(call, q) names any other limit (head dim, ...) for the call, or None.
    prefers_fn(call, q) says whether `auto` should hand this backend a call it supports, or try
    the next one in the device's order (a policy from measurements, benchmarks/RESULTS.md).
    forward_varlen, when set, takes packed tensors directly (see `attention_varlen`).
    """

    name: str
    forward: ForwardFn
    device_types: tuple[str, ...] | None = None  # None: any device
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    unsupported_features: Mapping[str, str] = field(default_factory=dict)
    unsupported_fn: Callable[[AttentionCall, torch.Tensor], str | None] = _no_other_limit
    available_fn: Callable[[], bool] = _always
    prefers_fn: Callable[[AttentionCall, torch.Tensor], bool] = _always
    forward_varlen: Callable | None = None

    def usable_on(self, device: torch.device) -> bool:
        if self.device_types is not None and device.type not in self.device_types:
            return False
        return self.available_fn()

    def unsupported(self, call: AttentionCall, q: torch.Tensor) -> str | None:
        """The first reason this backend cannot run the call, or None."""
        if not self.usable_on(q.device):
            return f"device {q.device}"
        if q.dtype not in self.dtypes:
            return f"dtype {q.dtype}"
        lacking = sorted(call.features() & self.unsupported_features.keys())
        if lacking:
            return f"{lacking[0]} ({self.unsupported_features[lacking[0]]})"
        return self.unsupported_fn(call, q)

    def prefers(self, call: AttentionCall, q: torch.Tensor) -> bool:
        """Whether `auto` should use this backend for a call it supports."""
        return bool(self.prefers_fn(call, q))


_REGISTRY: dict[str, Backend] = {}

# `auto`'s order per device type, fastest first (benchmarks/RESULTS.md): it takes the first
# backend that supports the call and prefers it. Registered backends missing from a device's
# list come after it, in the order they were registered.
AUTO_ORDER: dict[str, list[str]] = {
    "cpu": ["sdpa", "chunked", "reference"],
    "cuda": ["triton", "sdpa", "chunked", "reference"],
}


def register(backend: Backend, *, auto_rank: dict[str, int] | None = None) -> Backend:
    """Add a backend; `auto_rank` maps device type -> position in that device's `AUTO_ORDER`."""
    _REGISTRY[backend.name] = backend
    for device_type, rank in (auto_rank or {}).items():
        order = AUTO_ORDER.setdefault(device_type, [])
        if backend.name in order:
            order.remove(backend.name)
        order.insert(rank, backend.name)
    return backend


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {sorted(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def _ordered(device: torch.device) -> list[str]:
    order = [n for n in AUTO_ORDER.get(device.type, []) if n in _REGISTRY]
    order += [n for n in _REGISTRY if n not in order]
    return [n for n in order if _REGISTRY[n].usable_on(device)]


def backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable on `device` (default "auto": CUDA if present, else CPU), fastest first.

    Raises ValueError for an unknown device, or CUDA on a machine without it.
    """
    return _ordered(resolve_device(device))


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
    fallback = None
    for name in _ordered(q.device):
        candidate = _REGISTRY[name]
        reason = candidate.unsupported(call, q)
        if reason is None and candidate.prefers(call, q):
            return candidate
        if reason is None:
            fallback = fallback or candidate
            reason = "not preferred for this call"
        reasons.append(f"{name}: {reason}")
    if fallback is not None:
        return fallback
    raise NotImplementedError("no backend supports this call: " + "; ".join(reasons))
