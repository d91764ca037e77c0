"""Compile every triton kernel for sm_90 (H100/H200) and sm_80 (A100) without a GPU.

    python benchmarks/triton_compile_check.py --quick             # one case per kernel, ~20 s
    python benchmarks/triton_compile_check.py --target 90 --json out.json
    python benchmarks/triton_compile_check.py --max-seconds 1800   # stop starting compiles then
    python benchmarks/triton_compile_check.py --json out.json --resume   # skip what out.json's
                                                  # .partial.jsonl holds, append the rest to it

Prints one markdown row per (kernel, features, D, dtype, config): compiled or not, registers
per thread, spill bytes (stores + loads) and shared memory per target; then a summary: which
configs spill for fp16/bf16 at D <= 128, at D = 256, and in fp32, and each config's worst case.
The configs are exactly those autotuning may choose at each (dtype, D) (launch.CONFIGS). Cases
run most telling first (`compile_check.priority`); a run cut short by --max-seconds keeps what
finished in the .partial.jsonl, and --resume runs only the rest.
The logic lives in qkv/attention/triton/compile_check.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict

os.environ.pop("TRITON_INTERPRET", None)  # real kernels, not the interpreter's

import triton  # noqa: E402

from qkv.attention.triton import compile_check as cc  # noqa: E402

GROUPS = (
    ("fp16/bf16, D <= 128", lambda r: r["dtype"] != "fp32" and r["head_dim"] <= 128),
    ("fp16/bf16, D = 256", lambda r: r["dtype"] != "fp32" and r["head_dim"] == 256),
    ("fp32 (ieee dot)", lambda r: r["dtype"] == "fp32"),
)


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fits(r: dict) -> bool:
    """Compiled, with shared memory within the target's per-block limit."""
    return r["compiled"] and r["shared"] <= cc.SHARED_LIMIT[r["arch"]]


def cell(r: dict | None) -> str:
    if r is None:
        return "– | – | – | –"
    if not r["compiled"]:
        return f"FAIL ({r['error']}) | – | – | –"
    spill = "?" if r["spill"] is None else r["spill"]
    ok = "ok" if fits(r) else "smem > limit"
    return f"{ok} | {r['regs']} | {spill} | {r['shared']}"


def _header(columns, per_target, archs: list[int]) -> list[str]:
    """A markdown table's head and rule: `columns`, then `per_target` for each target (its
    first name formatted with the arch)."""
    names = [*columns]
    for a in archs:
        names += [per_target[0].format(a), *per_target[1:]]
    return ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]


def table(rows: list[dict], archs: list[int]) -> str:
    by_case = defaultdict(dict)
    for r in rows:
        key = (cc.KERNELS.index(r["kernel"]), list(cc.FEATURES).index(r["features"]),
               r["head_dim"], cc.DTYPES.index(r["dtype"]), r["config"])
        by_case[key][r["arch"]] = r
    lines = _header(("kernel", "features", "D", "dtype", "config"),
                    ("sm_{}", "regs", "spill B", "smem B"), archs)
    for key in sorted(by_case):
        r0 = next(iter(by_case[key].values()))
        line = "| " + " | ".join(str(r0[k]) for k in ("kernel", "features", "head_dim", "dtype",
                                                      "config")) + " |"
        for a in archs:
            line += f" {cell(by_case[key].get(a))} |"
        lines.append(line)
    return "\n".join(lines)


def summary(rows: list[dict], archs: list[int]) -> str:
    """Per group, kernel, config and target: cases compiled, cases spilling, worst spill."""
    lines = ["| group | kernel | config | target | compiled | smem > limit | spilling | max spill B"
             " | max regs |", "|---|---|---|---|---|---|---|---|---|"]
    for name, keep in GROUPS:
        agg = defaultdict(list)
        for r in rows:
            if keep(r):
                agg[(cc.KERNELS.index(r["kernel"]), r["config"], r["arch"])].append(r)
        for (k, config, arch), rs in sorted(agg.items(), key=lambda kv: (*kv[0][:2], -kv[0][2])):
            ok = [r for r in rs if r["compiled"]]
            spilling = [r for r in ok if r["spill"]]
            worst = max((r["spill"] or 0 for r in ok), default=0)
            regs = max((r["regs"] or 0 for r in ok), default=0)
            big = sum(not fits(r) for r in ok)
            lines.append(f"| {name} | {cc.KERNELS[k]} | {config} | sm_{arch} | {len(ok)}/{len(rs)}"
                         f" | {big} | {len(spilling)} | {worst} | {regs} |")
    return "\n".join(lines)


def worst(rows: list[dict], archs: list[int]) -> str:
    """Per group, kernel and config: its worst case over every feature set and head dim run,
    per target (spill bytes, registers, shared memory in KB)."""
    lines = _header(("group", "kernel", "config", "cases"),
                    ("sm_{} spill B", "regs", "smem KB"), archs)
    for name, keep in GROUPS:
        agg = defaultdict(list)
        for r in rows:
            if keep(r):
                agg[(cc.KERNELS.index(r["kernel"]), r["config"])].append(r)
        for (k, config), rs in sorted(agg.items()):
            line = f"| {name} | {cc.KERNELS[k]} | {config} | {len(rs)} |"
            for a in archs:
                ok = [r for r in rs if r["arch"] == a and r["compiled"]]
                if not ok:
                    line += " – | – | – |"
                    continue
                line += (f" {max(r['spill'] or 0 for r in ok)} | {max(r['regs'] or 0 for r in ok)}"
                         f" | {max(r['shared'] for r in ok) / 1024:.0f} |")
            lines.append(line)
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> str:
    """One line per group: does any config spill, and which configs are spill-free."""
    out = []
    failed = [r for r in rows if not r["compiled"]]
    out.append(f"- compiled: {len(rows) - len(failed)}/{len(rows)} (target, case) pairs"
               + (f"; failures: {sorted({(r['kernel'], r['config'], r['arch']) for r in failed})}"
                  if failed else ""))
    big = sorted({(r["kernel"], r["config"], r["arch"]) for r in rows
                  if r["compiled"] and not fits(r)})
    if big:
        out.append("- shared memory over the target's limit (launch would fail; the autotuner "
                   "skips it): " + ", ".join(f"{k} {c} sm_{a}" for k, c, a in big))
    for name, keep in GROUPS:
        rs = [r for r in rows if keep(r) and r["compiled"]]
        if not rs:
            continue
        bad = sorted({(r["kernel"], r["config"]) for r in rs if r["spill"]})
        clean = sorted({(r["kernel"], r["config"]) for r in rs} - set(bad))
        out.append(f"- {name}: {len(bad)} (kernel, config) pairs spill in some case: "
                   + (", ".join(f"{k} {c}" for k, c in bad) or "none")
                   + "; spill-free in every case run: "
                   + (", ".join(f"{k} {c}" for k, c in clean) or "none"))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one case per kernel (plain, D=64, fp16)")
    ap.add_argument("--target", default="all", choices=["90", "80", "all"])
    ap.add_argument("--json", help="write every result to this file")
    ap.add_argument("--workers", type=int, default=2, help="compile processes (default 2)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="start no compile after this many seconds; report what finished")
    ap.add_argument("--from-json", help="print the report of a saved --json (or .partial.jsonl)")
    ap.add_argument("--resume", action="store_true",
                    help="with --json: skip the compiles its .partial.jsonl holds, append to it")
    args = ap.parse_args()
    archs = list(cc.TARGETS) if args.target == "all" else [int(args.target)]
    if args.resume and not args.json:
        ap.error("--resume needs --json (it resumes that file's .partial.jsonl)")
    if args.from_json:
        rows = load(args.from_json)
        report(rows, [a for a in archs if any(r["arch"] == a for r in rows)])
        return
    if not cc.ptxas_available():
        sys.exit("ptxas not found in the triton wheel: nothing to compile with")
    todo = [(c, a) for c in (cc.quick_cases() if args.quick else cc.cases()) for a in archs]
    todo.sort(key=lambda ca: cc.priority(*ca))
    rows = []
    if args.resume and os.path.exists(args.json + ".partial.jsonl"):
        wanted = {(c, a) for c, a in todo}
        rows = [r for r in load(args.json + ".partial.jsonl") if (case_of(r), r["arch"]) in wanted]
        done = {(case_of(r), r["arch"]) for r in rows}
        todo = [(c, a) for c, a in todo if (c, a) not in done]
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {machine()}, {os.cpu_count()} cores; compile processes: {args.workers}; "
          f"triton {triton.__version__}; {len(todo)} compiles"
          + (f" ({len(rows)} done before, resumed)" if rows else "") + "\n", flush=True)
    start = time.perf_counter()
    ran = 0
    partial = (open(args.json + ".partial.jsonl", "a" if args.resume else "w")  # noqa: SIM115
               if args.json else None)
    for r in cc.compile_many(todo, workers=args.workers, max_seconds=args.max_seconds):
        ran += 1
        rows.append(r.as_dict())
        if partial:  # a run cut short keeps what finished
            partial.write(json.dumps(rows[-1]) + "\n")
            partial.flush()
    if partial:
        partial.close()
    wall = time.perf_counter() - start
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    per = sorted(r["seconds"] for r in rows[len(rows) - ran:])
    if per:
        print(f"{ran}/{len(todo)} compiles in {wall:.0f} s wall; one compile: median "
              f"{per[len(per) // 2]:.1f} s, max {per[-1]:.1f} s\n")
    report(rows, archs)


def load(path: str) -> list[dict]:
    """The rows of a saved --json (a list) or of its .partial.jsonl (one row a line)."""
    with open(path) as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def case_of(row: dict) -> cc.Case:
    """The Case a saved row was compiled from."""
    return cc.Case(**{k: row[k] for k in cc.Case.__dataclass_fields__})


def report(rows: list[dict], archs: list[int]) -> None:
    """The per-case table, then the summary and verdicts."""
    print(table(rows, archs))
    print("\n## Summary\n")
    print(summary(rows, archs))
    print("\n## Worst case of each config (every feature set and head dim run)\n")
    print(worst(rows, archs))
    print()
    print(verdicts(rows))


if __name__ == "__main__":
    main()
