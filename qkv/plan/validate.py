"""Measuring what the plan predicts: peak memory and time of one step on this CPU.

Each case runs in a fresh process (forked from a server that imported torch and qkv once; see
qkv.bench.memory), so that its memory high-water mark is its own. The peak is the
growth of the resident high-water mark (VmHWM) over the resident memory after imports and a
small warm-up run of the same code (thread pools, kernels loaded), so it counts the model's
weights, optimizer state, activations and cache: what the plan's total counts.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace

import torch

from qkv.bench import memory
from qkv.nn import TransformerConfig
from qkv.plan.calibrate import clock, cpu_clock
from qkv.plan.presets import ModelSpec, build

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Case:
    """One measured step: a model's settings (TransformerConfig fields), its kind, and the
    step (mode, backend, B rows of n tokens)."""

    model: dict = field(hash=False)
    mode: str
    backend: str
    n: int
    batch: int = 1
    kind: str = "decoder"
    dtype: str = "fp32"
    reps: int = 3
    threads: int = 0  # 0: torch's default

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec("case", self.kind, TransformerConfig.from_dict(self.model))

    def label(self) -> str:
        c = self.model
        return (f"{self.mode} {self.backend} n={self.n} B={self.batch} d={c['d_model']} "
                f"L={c['n_layers']} H={c['n_heads']}"
                + (f"/{c['n_kv_heads']}" if c.get("n_kv_heads") else ""))


def _train_steps(model, case: Case, reps: int) -> list[float]:
    """The trainer's step (qkv.train.steps): AdamW over matrices with decay, loss on every
    position, the logits held through backward, clipping, zero_grad(set_to_none)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    vocab = case.model["vocab_size"]
    x = torch.randint(vocab, (case.batch, case.n), generator=gen)
    y = torch.randint(vocab, (case.batch, case.n), generator=gen)
    times = []
    for _ in range(reps):
        start = clock()
        if case.kind == "decoder":
            _, loss = model(x, y, backend=case.backend)
        else:
            hidden = model(x, backend=case.backend)
            loss = hidden.float().square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(clock() - start)
    return times


def _prefill_steps(model, case: Case, reps: int) -> list[float]:
    """Forward passes without gradients over B x n tokens (last position's logits)."""
    x = torch.randint(case.model["vocab_size"], (case.batch, case.n),
                      generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for _ in range(reps):
            start = clock()
            if case.kind == "decoder":
                model(x, last_only=True, backend=case.backend)
            else:
                model(x, backend=case.backend)
            times.append(clock() - start)
    return times


def _decode_steps(model, case: Case, reps: int) -> list[float]:
    """Decode steps of one token per row against a DynamicCache filled with n - reps tokens
    of random keys and values (no prompt pass), so the last step sees n keys."""
    from qkv.nn import DynamicCache

    c = case.spec.config.attention()
    dtype = TORCH_DTYPES[case.dtype]
    cache = DynamicCache()
    filled = max(case.n - reps, 1)
    cache.step(None, case.batch, filled, "cpu")
    gen = torch.Generator().manual_seed(0)
    for layer in range(case.model["n_layers"]):
        shape = (case.batch, c.n_kv_heads, filled, c.head_dim)
        cache.update(layer, torch.randn(shape, generator=gen, dtype=dtype),
                     torch.randn(shape, generator=gen, dtype=dtype))
    x = torch.zeros(case.batch, 1, dtype=torch.long)
    times = []
    with torch.no_grad():
        for _ in range(reps):
            start = clock()
            model(x, cache=cache, last_only=True, backend=case.backend)
            times.append(clock() - start)
    return times


_STEPS = {"train": _train_steps, "prefill": _prefill_steps, "decode": _decode_steps}


def _run(case: Case, reps: int) -> list[float]:
    torch.manual_seed(0)
    model = build(case.spec, "cpu", TORCH_DTYPES[case.dtype] if case.mode != "train" else None)
    with torch.no_grad() if case.mode != "train" else contextlib.nullcontext():
        return _STEPS[case.mode](model, case, reps)


def measure_in_process(case: Case, fixed_mmap: bool = True, cpu_time: bool = False) -> dict:
    """Run `case` here: {"peak_bytes", "seconds", "fixed_mmap"} (seconds: the median step
    after the first; train and prefill repeat the step, decode takes `reps` steps). With
    `fixed_mmap`, see qkv.bench.memory.return_freed_memory; else glibc's default, whose freed
    blocks may stay resident. With `cpu_time`, seconds are this process's CPU seconds (see
    cpu_clock)."""
    fixed_mmap = memory.return_freed_memory() if fixed_mmap else False
    if case.threads:
        torch.set_num_threads(case.threads)
    small = replace(case, n=min(case.n, 16), batch=1,
                    model={**case.model, "n_layers": 1}, reps=2)
    _run(small, 2)  # warm-up: code paths, thread pools
    gc.collect()
    base = memory.resident_bytes()
    if not memory.reset_peak():
        raise OSError("cannot reset the memory high-water mark (/proc/self/clear_refs)")
    with cpu_clock() if cpu_time else contextlib.nullcontext():
        times = _run(case, max(case.reps, 2))
    steady = times[1:] if len(times) > 1 else times
    peak = memory.peak_resident_bytes() - base
    return {"peak_bytes": max(peak, 0), "seconds": statistics.median(steady),
            "fixed_mmap": fixed_mmap}


def fresh_processes() -> ProcessPoolExecutor:
    """An executor running each case in a process of its own, forked from a server that has
    imported torch and qkv.plan once."""
    return memory.fresh_processes(["qkv.plan.validate"])


def measure(case: Case, processes: ProcessPoolExecutor | None = None, *,
            fixed_mmap: bool = True, cpu_time: bool = False, timeout: float = 900) -> dict:
    """Peak memory and time of `case`, measured in a fresh process (one of `processes`)."""
    with contextlib.ExitStack() as stack:
        if processes is None:
            processes = stack.enter_context(fresh_processes())
        return processes.submit(measure_in_process, case, fixed_mmap,
                                cpu_time).result(timeout=timeout)


_BASE = {"vocab_size": 2048, "d_model": 256, "n_layers": 4, "n_heads": 4, "max_len": 8192}
_LLAMA = {"vocab_size": 2048, "d_model": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 2,
          "d_ff": 688, "max_len": 8192, "positions": "rope", "activation": "swiglu",
          "norm": "rmsnorm", "bias": False}

# The validation set of benchmarks/plan_validation.py: every mode on every CPU backend, a
# GPT-style and a Llama-style (GQA, RoPE, SwiGLU, RMSNorm) model, 100-400 MB each.
VALIDATION_CASES = (
    Case(_BASE, "train", "reference", 512, 4),
    Case(_BASE, "train", "chunked", 1024, 2),
    Case(_BASE, "train", "sdpa", 1024, 2),
    Case(_LLAMA, "train", "chunked", 1024, 2),
    Case(_BASE, "prefill", "reference", 1024, 2),
    Case(_BASE, "prefill", "chunked", 4096, 2),
    Case(_BASE, "prefill", "sdpa", 4096, 2),
    Case(_LLAMA, "prefill", "sdpa", 4096, 2),
    Case(_BASE, "decode", "reference", 2048, 8, reps=8),
    Case(_BASE, "decode", "chunked", 8192, 4, reps=8),
    Case(_BASE, "decode", "sdpa", 4096, 8, reps=8),
)


def calibrated_prediction(case: Case, cpu_time: bool = True) -> dict:
    """The plan's prediction for `case` as `qkv plan` makes it: calibrated here by the quick
    measurement (on case.threads threads; CPU seconds with `cpu_time`)."""
    from qkv.plan.calibrate import rates_for

    if case.threads:
        torch.set_num_threads(case.threads)
    with cpu_clock() if cpu_time else contextlib.nullcontext():
        rates = rates_for(case.spec, case.n, case.batch, case.mode, case.dtype,
                          torch.device("cpu"), bench=None)
    return predict(case, rates)


def predict(case: Case, rates) -> dict:
    """The plan's peak bytes and seconds for `case` on its backend, with `rates`."""
    from qkv.plan.estimate import make_plan

    plan = make_plan(case.spec, case.n, case.batch, case.dtype, case.mode, rates=rates)
    row = next(b for b in plan.backends if b.backend == case.backend)
    return {"peak_bytes": row.memory["total"], "seconds": row.seconds}


def validate(cases=VALIDATION_CASES, *, threads: int = 1, cpu_time: bool = True,
             progress=None) -> list[dict]:
    """Predicted against measured peak memory and time for each case, on `threads` CPU
    threads (the plan calibrated here on as many), timed in CPU seconds with `cpu_time` (see
    cpu_clock; for one thread on a shared machine) or else wall-clock seconds.

    Each case is planned in a fresh process, as `qkv plan` would (calibrated_prediction), then
    runs twice, each time in a fresh process: once with glibc's mmap threshold fixed
    (qkv.bench.memory.return_freed_memory), for the peak of the live tensors, and once under
    glibc's default settings, for the time and for the peak a user's process shows
    (`default_malloc_bytes`). Rows: label, predicted and measured bytes and seconds, and their
    ratios (predicted / measured)."""
    rows = []
    with fresh_processes() as processes:
        for case in cases:
            case = replace(case, threads=threads)
            predicted = processes.submit(calibrated_prediction, case, cpu_time).result()
            tensors = measure(case, processes, cpu_time=cpu_time)
            default = measure(case, processes, fixed_mmap=False, cpu_time=cpu_time)
            rows.append({"case": case.label(), "mode": case.mode, "backend": case.backend,
                         "predicted_bytes": predicted["peak_bytes"],
                         "measured_bytes": tensors["peak_bytes"],
                         "memory_ratio": predicted["peak_bytes"] / max(tensors["peak_bytes"], 1),
                         "default_malloc_bytes": default["peak_bytes"],
                         "predicted_seconds": predicted["seconds"],
                         "measured_seconds": default["seconds"],
                         "time_ratio": predicted["seconds"] / default["seconds"]})
            if progress is not None:
                progress(rows[-1])
    return rows
