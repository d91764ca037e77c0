"""Turn one run of benchmarks/gpu_check.sh into a ready section of benchmarks/RESULTS.md.

    python3 benchmarks/gpu_report.py OUT [--commit SHA] [--output OUT/RESULTS_section.md]

Reads what the run left in OUT: versions.txt, steps.tsv (step, budget, seconds, exit code),
the pytest logs (matrix_*.txt, gpu_tests_*.txt), attention_gpu.json (the sweep) and
gpu_tuning.json (decode threshold, auto's order). Whatever is missing is reported as missing.
Runs anywhere, no GPU needed (tests/bench/test_gpu_report.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

OUTCOMES = ("passed", "failed", "skipped", "deselected", "error", "errors", "xfailed", "xpassed")
_SUMMARY = re.compile(r"(\d+) (" + "|".join(OUTCOMES) + r")\b")
_VERBOSE = re.compile(r"::\S+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def _load(name: str):
    """A module of this folder, by file (benchmarks/ is not a package)."""
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_counts(text: str) -> tuple[dict[str, int], bool]:
    """Outcome counts of one pytest log, and whether it reached its final summary line. A log
    cut short (a timeout) is counted from its verbose per-test lines."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    last = next((ln for ln in reversed(lines) if re.search(r" in [\d.]+s", ln)
                 and _SUMMARY.search(ln)), None)
    counts: dict[str, int] = {}
    if last is not None:
        for n, what in _SUMMARY.findall(last):
            what = "error" if what == "errors" else what
            counts[what] = counts.get(what, 0) + int(n)
        return counts, True
    for what in _VERBOSE.findall(text):
        key = {"XFAIL": "xfailed", "XPASS": "xpassed"}.get(what, what.lower())
        counts[key] = counts.get(key, 0) + 1
    return counts, False


def failures(text: str) -> list[str]:
    """The short-summary lines (`-rfE`) of failed and erroring tests."""
    return [ln.strip() for ln in text.splitlines() if ln.startswith(("FAILED ", "ERROR "))]


def test_summary(out: Path, prefix: str) -> tuple[str, list[str]]:
    """One line over every log `prefix`*.txt (shards) and their failure lines."""
    logs = sorted(out.glob(f"{prefix}*.txt"))
    if not logs:
        return "not run", []
    total: dict[str, int] = {}
    cut, failed = 0, []
    for log in logs:
        text = log.read_text(errors="replace")
        counts, finished = pytest_counts(text)
        cut += not finished
        failed += failures(text)
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v
    parts = [f"{total[k]} {k}" for k in OUTCOMES if total.get(k)]
    line = ", ".join(parts) or "no result"
    line += f" ({len(logs)} process{'es' if len(logs) > 1 else ''}"
    line += f"; {cut} cut short, counted from their per-test lines)" if cut else ")"
    return line, failed


def steps_table(out: Path) -> str:
    path = out / "steps.tsv"
    if not path.exists():
        return "(no steps.tsv)"
    lines = ["| step | budget s | took s | exit |", "|---|---|---|---|"]
    for row in path.read_text().splitlines():
        parts = row.split("\t")
        if len(parts) == 4:
            name, budget, took, rc = parts
            note = " (timed out)" if rc in ("124", "137") else ""
            lines.append(f"| {name} | {budget} | {took} | {rc}{note} |")
    return "\n".join(lines)


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def render(out, commit: str | None = None, command: str | None = None) -> str:
    out = Path(out)
    sweep = _json(out / "attention_gpu.json")
    tuning = _json(out / "gpu_tuning.json")
    env = (sweep or {}).get("environment") or (tuning or {}).get("environment") or {}
    date = (env.get("date") or "date unknown").split(" ")[0]
    gpu = env.get("gpu") or "GPU unknown"
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "cuda", "python")
                         if env.get(k)) or "versions unknown"
    versions_txt = out / "versions.txt"
    if commit is None and versions_txt.exists():
        found = re.search(r"^commit (\S+)", versions_txt.read_text(), re.M)
        commit = found.group(1) if found and found.group(1) != "unknown" else None
    lines = [f"## {date} — GPU check on {gpu}", "",
             f"{versions}. Command: `{command or 'OUT=DIR bash benchmarks/gpu_check.sh'}`"
             + (f" at commit {commit}" if commit else "") + "."]
    if versions_txt.exists():
        lines += ["", "```", versions_txt.read_text().strip(), "```"]
    if env.get("copy_gbps"):
        lines += ["", f"Device-to-device copy: {env['copy_gbps'] / 1000:.2f} TB/s (bytes read "
                  "and written)."]
    lines += ["", "Steps:", "", steps_table(out), ""]
    for title, prefix in (("Conformance matrix on CUDA (test_matrix.py)", "matrix_"),
                          ("`gpu` tests (test_triton.py -m gpu)", "gpu_tests_")):
        line, failed = test_summary(out, prefix)
        lines.append(f"- {title}: {line}.")
        lines += [f"  - {f}" for f in failed[:20]]
        if len(failed) > 20:
            lines.append(f"  - ... and {len(failed) - 20} more")
    gpu_mod = _load_bench()
    if sweep and sweep.get("results"):
        rows = gpu_mod.target_rows(sweep["results"])
        lines += ["", "### Targets", "", gpu_mod.targets_markdown(rows).rstrip(), "",
                  "### FlashAttention sweep (bf16)", "",
                  gpu_mod.markdown_table(sweep["results"], targets=False).rstrip()]
    else:
        lines += ["", "### FlashAttention sweep", "", "No sweep results (attention_gpu.json)."]
    if tuning:
        md = _load("gpu_tuning").markdown(tuning.get("threshold") or [],
                                          tuning.get("ranking") or [])
        lines += ["", "### Split-KV decode threshold and auto's CUDA order", "", md.rstrip()]
    else:
        lines += ["", "### Split-KV decode threshold and auto's CUDA order", "",
                  "No tuning results (gpu_tuning.json)."]
    lines += ["", "What changed since the last GPU run, and what was predicted: (fill in).", ""]
    return "\n".join(lines)


def _load_bench():
    """qkv.bench.gpu (its writers), imported from the repository this script lives in."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from qkv.bench import gpu

    return gpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the folder gpu_check.sh wrote")
    ap.add_argument("--commit", help="the commit the run measured")
    ap.add_argument("--command", help="the command that ran")
    ap.add_argument("--output", help="also write the section to this file")
    args = ap.parse_args(argv)
    if not Path(args.out).is_dir():
        print(f"error: {args.out} is not a folder", file=sys.stderr)
        return 1
    section = render(args.out, args.commit, args.command)
    if args.output:
        Path(args.output).write_text(section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
