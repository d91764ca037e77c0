"""Validate `qkv plan` on this CPU: predicted peak memory and time of one step against
measurement, for every mode (train, prefill, decode) on every CPU backend (reference, chunked,
sdpa). Targets: memory within 15%, time within 30%.

Each case runs in a fresh process; its peak is the growth of the resident high-water mark over
the memory after imports and a warm-up (qkv.plan.validate.measure_in_process), with glibc told
to return freed blocks at once (a fixed mmap threshold) so that the resident memory follows the
live tensors; a second fresh process per case runs under glibc's default settings, where freed
blocks may stay resident, for the last column and for the time. Times are medians of steps
after the first, on one thread,
against the plan calibrated here by its quick measurement on one thread; both read the
process's CPU time (user + system), so that other work on a shared machine does not count
(`--wall-clock` reads the wall clock instead).

    python benchmarks/plan_validation.py [--wall-clock] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from qkv.plan.validate import validate  # noqa: E402
from qkv.units import format_bytes  # noqa: E402


def table(rows: list[dict]) -> str:
    head = ("| case | predicted memory | measured | ratio | predicted time | measured | ratio "
            "| measured memory, default malloc |")
    lines = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for r in rows:
        line = (f"| {r['case']} | {format_bytes(r['predicted_bytes'])} "
                f"| {format_bytes(r['measured_bytes'])} | {r['memory_ratio']:.2f} "
                f"| {r['predicted_seconds']:.3f} s | {r['measured_seconds']:.3f} s "
                f"| {r['time_ratio']:.2f} | {format_bytes(r['default_malloc_bytes'])} |")
        lines.append(line)
    memory_ok = sum(abs(r["memory_ratio"] - 1) <= 0.15 for r in rows)
    time_ok = sum(abs(r["time_ratio"] - 1) <= 0.30 for r in rows)
    lines += ["", f"memory within 15%: {memory_ok}/{len(rows)}; "
                  f"time within 30%: {time_ok}/{len(rows)}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wall-clock", action="store_true",
                        help="time in wall-clock seconds (default: one thread's CPU seconds)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    with open("/proc/loadavg") as f:
        print(f"load average before: {f.read().split()[:3]}", flush=True)
    rows = validate(threads=args.threads, cpu_time=not args.wall_clock,
                    progress=lambda r: print(r["case"], f"{r['memory_ratio']:.2f}",
                                             f"{r['time_ratio']:.2f}", flush=True))
    with open("/proc/loadavg") as f:
        print(f"load average after: {f.read().split()[:3]}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
