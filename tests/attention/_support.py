"""Shared machinery of the conformance suite: cases, inputs, runs and tolerances.

A `Case` describes one call (shapes and keywords). `make_inputs` builds its tensors in float64
from a seed derived from the case, `run` calls one backend and collects out, lse and every
gradient, and `assert_matches` compares a backend run against the float64 reference run on the
same (rounded) inputs.

Device. By default the matrix runs on CPU tensors, every backend usable there. With
QKV_TEST_DEVICE=cuda it runs on CUDA tensors instead: the backends usable on CUDA (the triton
kernels compiled for the device, not interpreted), while the float64 reference stays on the CPU.
QKV_TEST_BACKENDS=triton,sdpa narrows either list. See `select_backends`.
"""

from __future__ import annotations

import importlib
import os
import zlib
from dataclasses import dataclass, field

import pytest
import torch

import qkv

registry = importlib.import_module("qkv.attention.registry")


def select_backends(device: str, usable: list[str], requested: str | None = None) -> list[str]:
    """The backends the matrix runs on `device` ("cpu" or "cuda"), given the registry's list of
    those `usable` there: all of them on the CPU; on CUDA all but the reference, which stays the
    float64 oracle on the CPU. `requested` ("triton,sdpa") keeps only the names it lists."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"QKV_TEST_DEVICE must be 'cpu' or 'cuda', got {device!r}")
    chosen = list(usable) if device == "cpu" else [n for n in usable if n != "reference"]
    if requested:
        names = [n.strip() for n in requested.split(",") if n.strip()]
        unknown = sorted(set(names) - set(chosen))
        if unknown:
            raise ValueError(f"QKV_TEST_BACKENDS names {unknown}, not among the backends "
                             f"usable on {device}: {chosen}")
        chosen = [n for n in chosen if n in names]
    return chosen


# Where the matrix's backends run (module docstring); the reference always runs on the CPU.
DEVICE: str = os.environ.get("QKV_TEST_DEVICE", "cpu")
# Backends under test: by default every one the registry says is usable on the CPU.
BACKENDS: list[str] = select_backends(DEVICE, registry.backends(DEVICE),
                                      os.environ.get("QKV_TEST_BACKENDS"))

# Slow backends declare the largest sizes the matrix may give them (the Triton interpreter runs
# every program instance in Python). Cases above a cap are skipped for that backend.
SIZE_CAPS: dict[str, dict[str, int]] = {
    "triton": {"max_len": 320, "max_dim": 256},
}
# Backends whose full matrix runs only under `-m slow` (by default they run test_smoke.py).
# Empty: the Triton interpreter runs the whole matrix in about three minutes on 2 cores.
SLOW_BACKENDS: set[str] = set()



def legit_unsupported(name: str) -> set[str]:
    """Features a backend declares it cannot express (`Backend.unsupported_features`): it may
    refuse them with NotImplementedError. Any other refusal fails the test."""
    return set(registry.get(name).unsupported_features)


# (atol, rtol) of a backend result against the float64 reference, per input dtype. The error
# allowed is atol + rtol * max|expected|, so tensors of any magnitude compare alike.
TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (1.6e-2, 2.4e-2),
}
GRAD_TOL = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 6e-2),
}
LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


def best_dtype(name: str, device: str | None = None) -> torch.dtype:
    """float64 where the backend accepts it, else float32 on the CPU and float16 on CUDA (the
    tensor-core path GPU training runs; the low-precision and large-logit tests add bfloat16 and
    float32)."""
    if torch.float64 in registry.get(name).dtypes:
        return torch.float64
    return torch.float16 if (device or DEVICE) == "cuda" else torch.float32


@dataclass(frozen=True)
class Case:
    """One call: shapes, and keywords in a compact, printable form.

    mask / bias: None or a shape name ("full", "keys", "2d", "rows", "empty_rows");
    alibi: None, "h" for (Hq,) or "bh" for (B, Hq); kv_lengths: None or a tuple of ints.
    """

    id: str
    B: int = 2
    Hq: int = 2
    Hk: int = 2
    Lq: int = 37
    Lk: int = 45
    D: int = 16
    Dv: int = 16
    mask: str | None = None
    bias: str | None = None
    alibi: str | None = None
    kv_lengths: tuple[int, ...] | None = None
    kw: dict = field(default_factory=dict)  # causal, window, softcap, scale, dropout_p

    def __str__(self) -> str:
        return self.id

    def features(self) -> set[str]:
        used = {k for k, v in self.kw.items() if v not in (None, False, 0.0)}
        for name in ("mask", "bias", "kv_lengths"):
            if getattr(self, name) is not None:
                used.add(name)
        if self.alibi is not None:
            used.add("alibi_slopes")
        return used


def _mask_shape(kind: str, c: Case) -> tuple[int, ...]:
    return {
        "full": (c.B, c.Hq, c.Lq, c.Lk),
        "empty_rows": (c.B, c.Hq, c.Lq, c.Lk),
        "keys": (c.B, 1, 1, c.Lk),
        "2d": (c.Lq, c.Lk),
        "rows": (1, c.Hq, c.Lq, 1),
        "heads": (1, c.Hq, 1, 1),
    }[kind]


def make_inputs(c: Case, seed_extra: int = 0) -> tuple[tuple[torch.Tensor, ...], dict]:
    """q, k, v and the keyword tensors of a case, in float64, the same on every call."""
    g = torch.Generator().manual_seed(zlib.crc32(c.id.encode()) + seed_extra)
    f64 = dict(dtype=torch.float64, generator=g)
    q = torch.randn(c.B, c.Hq, c.Lq, c.D, **f64)
    k = torch.randn(c.B, c.Hk, c.Lk, c.D, **f64)
    v = torch.randn(c.B, c.Hk, c.Lk, c.Dv, **f64)
    kw = dict(c.kw)
    if c.mask is not None:
        shape = _mask_shape(c.mask, c)
        mask = torch.rand(shape, generator=g) < 0.75
        if c.mask == "empty_rows":
            mask[:, :, ::3] = False
        kw["mask"] = mask
    if c.bias is not None:
        kw["bias"] = torch.randn(_mask_shape(c.bias, c), **f64)
    if c.alibi is not None:
        shape = (c.Hq,) if c.alibi == "h" else (c.B, c.Hq)
        kw["alibi_slopes"] = 0.05 + 0.3 * torch.rand(shape, generator=g, dtype=torch.float32)
    if c.kv_lengths is not None:
        kw["kv_lengths"] = torch.tensor(c.kv_lengths)
    return (q, k, v), kw


def check_cap(name: str, c: Case) -> None:
    """Skip a case that is larger than the backend's declared size cap."""
    cap = SIZE_CAPS.get(name)
    if cap is None:
        return
    if max(c.Lq, c.Lk) > cap["max_len"] or max(c.D, c.Dv) > cap["max_dim"]:
        pytest.skip(f"{name}: case {c.id} exceeds size cap {cap}")


def call_features(kw: dict) -> set[str]:
    """Names (as backends report them) of the optional features a keyword dict uses."""
    used = set()
    for name, value in kw.items():
        if value is None or value is False:
            continue
        if name == "dropout_p" and value == 0.0:
            continue
        used.add(name)
    return used


def refused(name: str, err: NotImplementedError, kw: dict):
    """Check a backend's refusal names it and a feature it legitimately lacks, then skip."""
    msg = str(err)
    assert name in msg, f"NotImplementedError does not name the backend {name!r}: {msg}"
    legit = legit_unsupported(name) & call_features(kw)
    assert legit, f"backend {name!r} refused a call it should support: {msg}"
    assert any(f in msg for f in legit), f"message names none of {sorted(legit)}: {msg}"
    pytest.skip(f"{name} cannot express this call: {msg}")


def attend(name: str, q, k, v, **kw):
    """qkv.attention on one backend; a legitimate refusal becomes a skip."""
    try:
        return qkv.attention(q, k, v, backend=name, **kw)
    except NotImplementedError as err:
        refused(name, err, kw)


def cast(inputs, kw, dtype, grad_bias: bool, device: str | None = None):
    """Inputs in `dtype` on `device` (default `DEVICE`) as fresh leaves that require grad (bias
    too, when asked); the keyword tensors move to that device."""
    device = device or DEVICE
    q, k, v = (t.detach().to(device, dtype).requires_grad_() for t in inputs)
    kw = {key: value.to(device) if isinstance(value, torch.Tensor) else value
          for key, value in kw.items()}
    if "bias" in kw:
        kw["bias"] = kw["bias"].detach().to(dtype).requires_grad_(grad_bias)
    return (q, k, v), kw


def run(name: str, inputs, kw, dtype, *, with_lse: bool, seed: int = 0, grad_bias: bool = True,
        device: str | None = None):
    """Call one backend (on `device`, default `DEVICE`) and backpropagate fixed random
    cotangents through out (and lse)."""
    (q, k, v), kw = cast(inputs, kw, dtype, grad_bias, device)
    torch.manual_seed(seed)  # the dropout mask is drawn from torch's default generator
    res = attend(name, q, k, v, return_lse=with_lse, **kw)
    out, lse = res if with_lse else (res, None)
    g = torch.Generator().manual_seed(1234)
    dout = torch.randn(out.shape, dtype=torch.float64, generator=g).to(out.device)
    loss = (out.double() * dout).sum()
    if lse is not None:
        dlse = torch.randn(lse.shape, dtype=torch.float64, generator=g).to(lse.device)
        finite = torch.isfinite(lse)
        loss = loss + (torch.where(finite, lse, 0.0).double() * dlse).sum()
    loss.backward()
    got = {"out": out.detach(), "lse": None if lse is None else lse.detach(),
           "dq": q.grad, "dk": k.grad, "dv": v.grad}
    if "bias" in kw and kw["bias"].requires_grad:
        got["dbias"] = kw["bias"].grad
    return got


def reference_run(inputs, kw, dtype, *, with_lse: bool, seed: int = 0, grad_bias: bool = True):
    """The float64 reference, on the CPU, on the inputs rounded to `dtype` (so both see the same
    numbers)."""
    rounded = tuple(t.to(dtype).double() for t in inputs)
    kw = dict(kw)
    if "bias" in kw:
        kw["bias"] = kw["bias"].to(dtype).double()
    return run("reference", rounded, kw, torch.float64, with_lse=with_lse, seed=seed,
               grad_bias=grad_bias, device="cpu")


def assert_close(actual, expected, tol, what: str):
    """|actual - expected| <= atol + rtol * max|expected|, with -inf matching -inf exactly (on
    the CPU, wherever the two were computed)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert not torch.isnan(a).any(), f"{what}: NaN"
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    assert torch.equal(inf_a, inf_e) and torch.equal(a[inf_a], e[inf_e]), f"{what}: infs differ"
    a, e = a[~inf_a], e[~inf_e]
    if e.numel() == 0:
        return
    atol, rtol = tol
    err = (a - e).abs().max().item()
    allowed = atol + rtol * e.abs().max().item()
    assert err <= allowed, f"{what}: max error {err:.3g} > {allowed:.3g}"


def assert_matches(got: dict, ref: dict, dtype: torch.dtype, label: str = ""):
    """Compare every result and gradient of a backend run against the reference run."""
    for key, value in got.items():
        if value is None:
            continue
        tol = TOL[dtype] if key in ("out", "lse") else GRAD_TOL[dtype]
        assert ref[key] is not None, f"{label}{key}: reference has none"
        assert_close(value, ref[key], tol, f"{label}{key}")
