"""Throughputs that turn a plan's FLOPs and bytes into seconds.

Three sources, in order of preference:
- `qkv bench` results (the results.json that `qkv bench --device cpu --out DIR` writes; `qkv
  plan` looks in runs/bench/results.json unless told otherwise) give the attention backends'
  FLOP rates, by mode, causality and the sequence length nearest the plan's;
- a quick measurement on the plan's device (a second or a few): a matmul of the model's widths,
  one attention call per backend at min(n, 1024 or 4096), a memory-bound add and a tiny op's
  overhead, and, for layers up to 50M parameters, one of the model's own layers, its LM head and its
  optimizer step (qkv.plan.layer_timing), which the plan scales to the whole step;
- nominal figures, when nothing is measured: the estimate is then marked "uncalibrated".
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

DEFAULT_BENCH_RESULTS = Path("runs/bench/results.json")
QUICK_MAX_N = 1024  # tokens of the quick attention call on `reference`
QUICK_LINEAR_MAX_N = 4096  # and on the backends whose memory is linear in n
QUICK_FLOPS = 1.5e9  # the largest attention call the quick measurement makes
_NOMINAL_ATTENTION = {"reference": 5e9, "chunked": 30e9, "sdpa": 60e9, "triton": 100e12}


@dataclass(frozen=True)
class Rates:
    """matmul and attention FLOP/s ({backend: {"fwd"|"fwd_bwd": FLOP/s}}), memory bandwidth
    in bytes/s, the fixed cost of one small op in seconds, and where they came from."""

    matmul: float
    attention: dict = field(hash=False)
    bandwidth: float
    op_seconds: float
    source: str  # "qkv bench results (PATH)", "quick measurement on DEVICE" or "uncalibrated"
    layer: object = field(default=None, hash=False)  # a LayerTiming (qkv.plan.layer_timing)

    @property
    def calibrated(self) -> bool:
        return self.source != "uncalibrated"


def nominal() -> Rates:
    """Round figures for a two-core CPU; estimates from them are marked uncalibrated."""
    return Rates(50e9, {b: {"fwd": r, "fwd_bwd": r} for b, r in _NOMINAL_ATTENTION.items()},
                 5e9, 5e-6, "uncalibrated")


_CLOCK = [time.perf_counter]


def clock() -> float:
    """What timings read: wall-clock seconds, or this process's CPU seconds in `cpu_clock`."""
    return _CLOCK[0]()


@contextlib.contextmanager
def cpu_clock():
    """Time with this process's CPU time (user and system) instead of the wall clock: on a
    machine shared with other work, one thread's CPU seconds leave out the time that others
    hold the cores."""
    _CLOCK.insert(0, time.process_time)
    try:
        yield
    finally:
        _CLOCK.pop(0)


def _seconds(fn, reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _attention_rate(backend: str, heads: int, head_dim: int, n: int, causal: bool, mode: str,
                    dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of one qkv.attention call (B = 1) on `backend`."""
    import qkv
    from qkv.attention.flops import attention_flops

    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=gen, device=device, dtype=dtype,
                           requires_grad=mode == "fwd_bwd") for _ in range(3))

    def call():
        out = qkv.attention(q, k, v, causal=causal, backend=backend)
        if mode == "fwd_bwd":
            out.backward(torch.ones_like(out))
        _sync(device)

    with torch.enable_grad() if mode == "fwd_bwd" else torch.no_grad():
        seconds = _seconds(call, reps=2)
    return attention_flops(1, heads, n, n, head_dim, causal=causal, mode=mode) / seconds


def quick(d_model: int, d_ff: int, batch_heads: int, head_dim: int, n: int, causal: bool,
          backends: list[str], modes: list[str], dtype: torch.dtype = torch.float32,
          device: str | torch.device = "cpu") -> Rates:
    """Measure the rates here (about a second on a CPU): a (1024 x d_model) @ (d_model x d_ff)
    matmul, one attention call per backend and mode over min(n, 1024) tokens (4096 for the
    backends linear in n) and as many of the step's `batch_heads` heads as QUICK_FLOPS
    allows, a 32 MB add and a tiny add's overhead."""
    from qkv.attention.flops import attention_flops

    device = torch.device(device)
    a = torch.randn(1024, d_model, device=device, dtype=dtype)
    w = torch.randn(d_model, min(d_ff, 4096), device=device, dtype=dtype)
    matmul = 2.0 * 1024 * d_model * w.shape[1] / _seconds(lambda: (a @ w, _sync(device)))
    big = [torch.ones(8 << 20, device=device) for _ in range(3)]
    bandwidth = 3 * big[0].nbytes / _seconds(lambda: (torch.add(big[0], big[1], out=big[2]),
                                                       _sync(device)))
    tiny = torch.ones(8, device=device)
    op = _seconds(lambda: [tiny.add(1.0) for _ in range(200)]) / 200
    attention = {}
    for b in backends:
        m = max(1, min(n, QUICK_MAX_N if b == "reference" else QUICK_LINEAR_MAX_N))
        one = attention_flops(1, 1, m, m, head_dim, causal=causal, mode=modes[0])
        rows = max(1, min(batch_heads, int(QUICK_FLOPS // one)))
        attention[b] = {mode: _attention_rate(b, rows, head_dim, m, causal, mode, dtype, device)
                        for mode in modes}
    return Rates(matmul, attention, bandwidth, op, f"quick measurement on {device}")


def _usable_rows(path: Path, causal: bool) -> list[dict]:
    """The rows of the `qkv bench` results at `path` that have a rate and match `causal`, each
    checked: a positive sequence length n and a positive, finite tflops. ValueError naming the
    file and the row otherwise."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError("not a list of objects")
    except ValueError as e:
        raise ValueError(f"{path} is not `qkv bench` results (a JSON list of rows): {e}") from None
    usable = []
    for i, r in enumerate(rows):
        if not r.get("tflops") or r.get("causal") != causal:
            continue
        n, tflops = r.get("n"), r["tflops"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{path}: row {i} is not a `qkv bench` result: its sequence length "
                             f"n must be a positive integer, got {n!r}")
        if (isinstance(tflops, bool) or not isinstance(tflops, int | float)
                or not math.isfinite(tflops) or tflops <= 0):
            raise ValueError(f"{path}: row {i} is not a `qkv bench` result: tflops must be a "
                             f"positive number, got {tflops!r}")
        usable.append(r)
    return usable


def from_bench(rates: Rates, path: str | Path, n: int, causal: bool) -> Rates | None:
    """`rates` with the attention rates of `qkv bench` results at `path` (the row of each
    backend, mode and causality at the sequence length nearest n), or None when the file does
    not exist or holds no usable row. A file that is not such results, or a row with a rate but
    no positive n or tflops, raises ValueError naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        return None
    usable = _usable_rows(path, causal)
    attention = {b: dict(modes) for b, modes in rates.attention.items()}
    found = False
    for backend in attention:
        for mode in ("fwd", "fwd_bwd"):
            mine = [r for r in usable if r.get("backend") == backend and r.get("mode") == mode]
            if mine:
                best = min(mine, key=lambda r: abs(math.log(r["n"] / max(n, 1))))
                attention[backend][mode] = best["tflops"] * 1e12
                found = True
    if not found:
        return None
    return replace(rates, attention=attention, source=f"qkv bench results ({path})")


def rates_for(spec, n: int, batch: int, mode: str, dtype: str, device: torch.device,
              bench: str | Path | None = DEFAULT_BENCH_RESULTS, measure: bool = True) -> Rates:
    """The rates `qkv plan` uses for `spec`: a quick measurement on `device` (unless
    `measure` is false: nominal, uncalibrated), its attention rates replaced by `qkv bench`
    results where `bench` names an existing results file (CPU results, for a CPU device).
    Without a measurement no bench file is read, so `measure=False` with a `bench` other than
    None or the default raises ValueError rather than ignore it."""
    from qkv.plan.estimate import DEVICE_BACKENDS

    if not measure:
        if bench is not None and Path(bench) != DEFAULT_BENCH_RESULTS:
            raise ValueError(f"bench {str(bench)!r} is read only when the rates are measured "
                             "(measure=True)")
        return nominal()
    c = spec.config.attention()
    causal = spec.kind == "decoder"
    backends = list(DEVICE_BACKENDS[device.type])
    modes = ["fwd_bwd" if mode == "train" else "fwd"]
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if device.type == "cpu" and dtype == "fp16":
        torch_dtype["fp16"] = torch.float32  # CPU fp16 kernels are no guide; time fp32
    rates = quick(spec.config.d_model, spec.config.feed_forward().d_ff, batch * c.n_heads,
                  c.head_dim, n, causal, backends, modes, torch_dtype[dtype], device)
    from qkv.plan.layer_timing import time_layer

    layer = time_layer(spec, n, batch, mode, torch_dtype[dtype], device, backends,
                       rates.attention)
    if layer is not None:
        rates = replace(rates, layer=layer, source=rates.source + " (with the model's layer)")
    if bench is not None and device.type == "cpu":
        found = from_bench(rates, bench, n, causal)
        if found is not None:
            return replace(found, source=found.source + ", other rates by " + rates.source)
    return rates
