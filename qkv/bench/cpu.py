"""CPU benchmark: time and peak memory of qkv's reference and chunked backends beside torch SDPA
(the backend "sdpa", as qkv.backends() names it).

When memory is measured, each case runs in a fresh process so that its peak resident memory can
be read from the kernel (qkv.bench.memory) without earlier cases' allocations in the way; the peak
growth above the inputs is reported. The processes fork from a server that imported torch once
(multiprocessing's forkserver), so a case does not pay for the imports. Timing-only sweeps
(`memory=False`) run every case in this process. Times are medians of repeated runs after a
warm-up, and every row carries its ratio to sdpa's time on the same case, in the same sweep.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import torch

import qkv
from qkv.attention.flops import attention_flops
from qkv.bench import CPU_BACKENDS, CPU_REPS, CPU_SEQLENS, memory
from qkv.bench.memory import peak_resident_bytes
from qkv.units import format_bytes

BACKENDS = CPU_BACKENDS


@dataclass
class CpuCase:
    n: int
    heads: int = 8
    head_dim: int = 64
    batch: int = 1
    causal: bool = False
    mode: str = "fwd"  # "fwd" or "fwd_bwd"
    backend: str = "chunked"  # "sdpa" (F.scaled_dot_product_attention), "chunked", "reference"
    reps: int = CPU_REPS
    threads: int = 0  # 0: torch's default


def score_matrix_bytes(case: CpuCase) -> int:
    """Bytes of one fp32 (B, H, n, n) score matrix: what the O(n^2) computation holds at least."""
    return case.batch * case.heads * case.n * case.n * 4


def _run_once(case: CpuCase, q, k, v, grad):
    if case.backend == "sdpa":
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=case.causal)
    else:
        out = qkv.attention(q, k, v, causal=case.causal, backend=case.backend)
    if case.mode == "fwd_bwd":
        out.backward(grad)
    return out


def _inputs(case: CpuCase, n: int):
    gen = torch.Generator().manual_seed(0)
    shape = (case.batch, case.heads, n, case.head_dim)
    q, k, v, grad = (torch.randn(shape, generator=gen) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(case.mode == "fwd_bwd")
    return q, k, v, grad


def measure_in_process(case: CpuCase) -> dict:
    """Run one case here; returns seconds (median), peak memory growth in bytes and TFLOP/s.

    The memory is the growth of the resident high-water mark over the inputs (q, k, v and the
    output gradient), after a small warm-up call has loaded the code and thread pools; it
    includes the outputs (out, and dq, dk, dv for fwd_bwd).
    """
    if case.threads:
        torch.set_num_threads(case.threads)
    need_grad = case.mode == "fwd_bwd"
    with torch.enable_grad() if need_grad else torch.no_grad():
        _run_once(case, *_inputs(case, min(case.n, 256)))
    q, k, v, grad = _inputs(case, case.n)
    rss0 = peak_resident_bytes()
    context = torch.enable_grad() if need_grad else torch.no_grad()
    with context:
        _run_once(case, q, k, v, grad)  # warm-up, and the memory high-water mark
        peak = peak_resident_bytes() - rss0
        times = []
        for _ in range(case.reps):
            for t in (q, k, v):
                t.grad = None
            start = time.perf_counter()
            _run_once(case, q, k, v, grad)
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    flops = attention_flops(case.batch, case.heads, case.n, case.n, case.head_dim,
                            causal=case.causal, mode=case.mode)
    return {**asdict(case), "seconds": seconds, "peak_bytes": peak,
            "score_matrix_bytes": score_matrix_bytes(case), "tflops": flops / seconds / 1e12}


def fresh_processes() -> ProcessPoolExecutor:
    """An executor that runs each case in a process of its own, forked from a server process
    that has imported torch and qkv once: a clean memory high-water mark per case without
    paying the imports per case."""
    return memory.fresh_processes(["qkv.bench.cpu"])


def measure(case: CpuCase, processes: ProcessPoolExecutor | None = None,
            timeout: float = 1800) -> dict:
    """Run one case in a fresh process (clean memory high-water mark), one of `processes`."""
    with contextlib.ExitStack() as stack:
        if processes is None:
            processes = stack.enter_context(fresh_processes())
        return processes.submit(measure_in_process, case).result(timeout=timeout)


def reference_fits(case: CpuCase, budget_bytes: float) -> bool:
    """The reference keeps several n x n matrices (scores, weights, their gradients)."""
    copies = 3 if case.mode == "fwd" else 6
    return score_matrix_bytes(case) * copies < budget_bytes


def tensors_bytes(case: CpuCase) -> int:
    """Bytes of the tensors every backend holds: q, k, v, the output gradient and the output,
    and for fwd_bwd also dq, dk, dv."""
    one = case.batch * case.heads * case.n * case.head_dim * 4
    return one * (5 if case.mode == "fwd" else 8)


def machine_memory_bytes() -> int:
    """The memory this machine has available now (MemAvailable), else its physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 2**63


def skip_reason(case: CpuCase, memory_budget: float, machine_bytes: float) -> str | None:
    """Why `case` cannot run here (its tensors exceed the machine's memory, or the reference's
    n x n matrices exceed `memory_budget`), else None."""
    if tensors_bytes(case) >= machine_bytes:
        return (f"needs > {format_bytes(tensors_bytes(case))} for q, k, v and outputs "
                f"({format_bytes(machine_bytes)} available)")
    if case.backend == "reference" and not reference_fits(case, memory_budget):
        return f"needs > {format_bytes(score_matrix_bytes(case))} per n x n matrix"
    return None


def measure_time(case: CpuCase) -> dict:
    """Run one case in this process; its row without the memory columns."""
    row = measure_in_process(case)
    del row["peak_bytes"]
    return row


def sweep(ns=CPU_SEQLENS, modes=("fwd", "fwd_bwd"), causals=(False, True), backends=BACKENDS,
          reps: int = CPU_REPS, memory: bool = True, memory_budget: float = 12e9, progress=None):
    """Every (n, mode, causal, backend) case; rows skipped for memory say so in 'skipped' (a
    case whose tensors exceed the machine's memory, or a reference case over `memory_budget`).
    With `memory`, each case runs in its own process (`measure`), else all run here."""
    rows = []
    cases = [CpuCase(n=n, causal=c, mode=m, backend=b, reps=reps)
             for n in ns for m in modes for c in causals for b in backends]
    machine_bytes = machine_memory_bytes()
    with fresh_processes() if memory else contextlib.nullcontext() as processes:
        for case in cases:
            if (reason := skip_reason(case, memory_budget, machine_bytes)) is not None:
                rows.append({**asdict(case), "skipped": reason})
            else:
                rows.append(measure(case, processes) if memory else measure_time(case))
            if progress is not None:
                progress(case)
    return add_ratios(rows)


def add_ratios(rows: list[dict]) -> list[dict]:
    """Attach to each row its time relative to sdpa's row of the same case."""
    sdpa_rows = {(r["n"], r["mode"], r["causal"]): r for r in rows
                 if r["backend"] == "sdpa" and "seconds" in r}
    for r in rows:
        base = sdpa_rows.get((r["n"], r["mode"], r["causal"]))
        if base is not None and "seconds" in r:
            r["time_vs_sdpa"] = r["seconds"] / base["seconds"]
    return rows


def causal_speedups(rows: list[dict]) -> dict:
    """Non-causal over causal time per (backend, n, mode): about 2 if masked blocks are skipped."""
    out = {}
    timed = {(r["backend"], r["n"], r["mode"], r["causal"]): r["seconds"]
             for r in rows if "seconds" in r}
    for (b, n, m, causal), sec in timed.items():
        if not causal and (b, n, m, True) in timed:
            out[(b, n, m)] = sec / timed[(b, n, m, True)]
    return out


def markdown_table(rows: list[dict]) -> str:
    """The sweep as a markdown table."""
    lines = [
        "| n | mode | causal | backend | time (s) | vs sdpa | GFLOP/s | peak extra memory "
        "| % of n×n fp32 scores |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        head = f"| {r['n']} | {r['mode']} | {r['causal']} | {r['backend']} "
        if "skipped" in r:
            lines.append(head + f"| skipped: {r['skipped']} | | | | |")
            continue
        ratio = r.get("time_vs_sdpa")
        memory = ("| not measured | " if "peak_bytes" not in r else
                  f"| {format_bytes(r['peak_bytes'])} "
                  f"| {100.0 * r['peak_bytes'] / r['score_matrix_bytes']:.2f}% ")
        lines.append(
            head + f"| {r['seconds']:.3f} | {'' if ratio is None else f'{ratio:.2f}×'} "
            f"| {r['tflops'] * 1e3:.1f} " + memory + "|"
        )
    speedups = causal_speedups(rows)
    if speedups:
        lines += ["", "| backend | n | mode | non-causal / causal time |", "|---|---:|---|---:|"]
        for (b, n, m), s in sorted(speedups.items()):
            lines.append(f"| {b} | {n} | {m} | {s:.2f} |")
    return "\n".join(lines)


def machine_description() -> str:
    """CPU model, core count and torch version, for RESULTS.md."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{model}, {cores} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, python {sys.version.split()[0]}")
