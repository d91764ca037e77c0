"""What the cost and scale rows share: timing a step, its peak memory in a fresh process,
doubling sizes, log-log slopes and log-log plots.

A case's peak memory is the growth of the process's resident high-water mark over what it held
just before its first call (the mark is reset first where Linux lets us, via clear_refs), read
in a process of its own, forked from a server that imported torch once (qkv.bench.memory).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from qkv.bench.memory import peak_resident_bytes, reset_peak, return_freed_memory

SMALLEST_N = 256  # the shortest sequence of the cost and scale rows
TIME_CAP = 2.0  # seconds of timed runs per case before the repetitions stop
# A case predicted to need more memory than this runs without a warm-up: the first call's
# one-time costs (some tens of MB) are lost in its peak, and the warm-up would double its time.
WARMUP_BELOW = 1 << 30
THREADS = 1  # the rows time every kind on one thread: on a shared machine, more threads wait
# on each other (5-10x slower on 2 busy cores), and one thread compares the work each kind does


@contextlib.contextmanager
def threads(count: int = THREADS) -> Iterator[None]:
    """torch on `count` threads inside the block, as before after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_elsewhere(function: Callable, case, processes: ProcessPoolExecutor | None):
    """function(case) in a fresh process of `processes`, or here when it is None.

    ChildProcessError (an OSError) naming the case if that process dies before it answers:
    most likely the system killed it for want of memory."""
    if processes is None:
        return function(case)
    try:
        return processes.submit(function, case).result(timeout=1800)
    except BrokenProcessPool:
        raise ChildProcessError(f"the process measuring {case} died before it finished (the "
                                "system may have killed it for want of memory); try a smaller "
                                "memory budget or max_len") from None


def timed_runs(step: Callable[[], None], reps: int, *, memory: bool, warmup: bool = True,
               cap: float = TIME_CAP) -> dict:
    """Run `step` once untimed if `warmup` (the first call of a size pays one-time costs, tens
    of MB that stay), then once timed (measuring its peak memory above the baseline, if
    `memory`), then more, up to `reps` timed runs in all, until `cap` seconds are spent (none
    after a first timed run over 2 * cap). Returns seconds (the median of the timed runs),
    times and peak_bytes (None without `memory`)."""
    if memory:
        return_freed_memory()
    if warmup:
        step()
    if memory:
        reset_peak()
    baseline = peak_resident_bytes() if memory else 0
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    peak = peak_resident_bytes() - baseline if memory else None
    times = [first]
    while len(times) < reps and sum(times) < cap and first < 2 * cap:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "times": times, "peak_bytes": peak}


def doubling(start: int, longest: int) -> list[int]:
    """start, 2 start, 4 start, ... up to longest."""
    sizes = []
    while start <= longest:
        sizes.append(start)
        start *= 2
    return sizes


def loglog_slope(xs: Sequence[float], ys: Sequence[float | None]) -> float | None:
    """The slope of log y against log x, fitted by numpy.polyfit over the upper half of the
    points (all of them when there are fewer than four); None with fewer than two points."""
    import numpy as np

    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and y > 0]
    upper = pairs[len(pairs) // 2:] if len(pairs) >= 4 else pairs
    if len(upper) < 2:
        return None
    x, y = np.log([p[0] for p in upper]), np.log([p[1] for p in upper])
    return float(np.polyfit(x, y, 1)[0])


def loglog_figure(series: dict[str, tuple[list, list]], *, xlabel: str, ylabel: str,
                  title: str, base: int = 2):
    """A log-log line plot with one labelled line per series {label: (xs, ys)}; (fig, ax)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (xs, ys) in series.items():
        points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and y > 0]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set_xscale("log", base=base)
    ax.set_yscale("log")
    ticks = sorted({x for xs, _ in series.values() for x in xs})
    if 0 < len(ticks) <= 12:  # the sizes themselves, not powers of the base
        ax.set_xticks(ticks, [str(x) for x in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend()
    return fig, ax
