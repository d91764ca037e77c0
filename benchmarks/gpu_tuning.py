"""Two rules set from GPU measurements: the split-KV decode threshold, and `auto`'s CUDA order.

    PYTHONPATH=. python3 benchmarks/gpu_tuning.py --out OUT [--quick]
    PYTHONPATH=. python3 benchmarks/gpu_tuning.py --warm I/N

1. Decode threshold. qkv/attention/triton/function.py runs the split-KV decode kernels when
   Lq <= DECODE_MAX_LQ (16), groups * Lq <= DECODE_MAX_ROWS (64) and Lk >= DECODE_MIN_LK. Here
   the triton forward is timed both ways at each (Lq, Lk): split with DECODE_MIN_LK set to 0,
   the plain forward kernel with it set above every Lk (the module reads it at each call; the
   kernels are untouched). Shape: a generation step, batch 8, 32 query heads over 8 K/V heads,
   d = 128, bf16, causal (bottom-right). Per Lq, the threshold is the least Lk measured from
   which split wins (plain / split > 1) at that Lk and every larger one (`split_thresholds`).
2. auto's CUDA order. Forward and forward+backward of typical calls (plain, causal, GQA decode,
   sliding window, kv_lengths, bias, ALiBi) on qkv's triton, chunked and sdpa backends, sdpa
   both as torch chooses and held to its flash, cuDNN and efficient kernels (a kernel that
   cannot take the call is recorded as an error).

Writes OUT/gpu_tuning.json and OUT/gpu_tuning.md. `--warm I/N` runs, without timing, the I-th
of N shares of every triton call that this script and the sweep (qkv/bench/gpu.py) make, so
that N processes compile the kernels in parallel into Triton's cache before the timed runs.
Only the measuring needs CUDA; the rules and the writers run anywhere
(tests/bench/test_gpu_tuning.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

LQS = (1, 2, 4, 8, 16)
LKS = (256, 512, 1024, 2048, 4096, 8192, 16384)
QUICK_LQS = (1, 4, 16)
QUICK_LKS = (512, 1024, 4096, 16384)
DECODE_SHAPE = dict(batch=8, heads=32, kv_heads=8, head_dim=128)
RANK_PROVIDERS = ("triton", "chunked", "sdpa", "sdpa:flash", "sdpa:cudnn", "sdpa:efficient")
# Call kinds: (B, Hq, Hk, Lq, Lk, keywords); d = 128, bf16. Tensors named in `tensors` are built
# by `_call_inputs`.
CALL_KINDS = {
    "plain": (4, 16, 16, 2048, 2048, {}),
    "causal": (4, 16, 16, 2048, 2048, {"causal": True}),
    "gqa_decode": (8, 32, 8, 1, 8192, {"causal": True}),
    "window": (4, 16, 16, 4096, 4096, {"causal": True, "window": (1024, 0)}),
    "kv_lengths": (4, 16, 16, 2048, 2048, {"causal": True, "kv_lengths": "random"}),
    "bias": (4, 16, 16, 2048, 2048, {"bias": "heads"}),
    "alibi": (4, 16, 16, 2048, 2048, {"causal": True, "alibi_slopes": "heads"}),
}


# ---- rules (anywhere) ------------------------------------------------------------------------

def split_thresholds(rows: list[dict]) -> dict[int, int | None]:
    """Per Lq, the least Lk measured from which split-KV is faster than the plain forward at
    that Lk and at every larger one; None where split is not faster at the largest Lk."""
    out: dict[int, int | None] = {}
    for lq in sorted({r["lq"] for r in rows}):
        pts = sorted((r["lk"], r["plain_ms"] / r["split_ms"]) for r in rows
                     if r["lq"] == lq and r.get("split_ms") and r.get("plain_ms"))
        best = None
        for lk, speedup in reversed(pts):
            if speedup <= 1.0:
                break
            best = lk
        out[lq] = best
    return out


def timed_lqs(rows: list[dict]) -> set[int]:
    """The Lq with at least one (Lk) point timed both ways."""
    return {r["lq"] for r in rows if r.get("split_ms") and r.get("plain_ms")}


def threshold_rule(thresholds: dict[int, int | None], timed=None) -> str:
    """One sentence: the DECODE_MIN_LK (and DECODE_MAX_LQ) the measurements call for. `timed`:
    the Lq that have timings (default all); an Lq without any is not counted as a loss."""
    timed = set(thresholds) if timed is None else set(timed)
    won = {lq: lk for lq, lk in thresholds.items() if lk is not None}
    if not won:
        return "split-KV never beat the plain forward at the largest cache measured: keep it off."
    never = sorted(lq for lq, lk in thresholds.items() if lk is None and lq in timed)
    text = (f"DECODE_MIN_LK = {max(won.values())} is right for every Lq in {sorted(won)} "
            f"(per Lq: {', '.join(f'{lq}: {lk}' for lq, lk in sorted(won.items()))})")
    if never:
        text += (f"; split never won for Lq in {never}, so DECODE_MAX_LQ should be below "
                 f"{min(never)}")
    return text + "."


def ranking(rows: list[dict]) -> list[dict]:
    """Per (call kind, mode): providers fastest first, and triton's time over the best other."""
    out = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows if r["kind"] == kind):
            timed = sorted((r["ms"], r["provider"]) for r in rows
                           if r["kind"] == kind and r["mode"] == mode and r.get("ms"))
            mine = next((ms for ms, p in timed if p == "triton"), None)
            other = next((ms for ms, p in timed if p != "triton"), None)
            out.append(dict(kind=kind, mode=mode, order=[p for _, p in timed],
                            triton_vs_best_other=mine / other if mine and other else None))
    return out


def _fmt(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(threshold_rows: list[dict], rank_rows: list[dict]) -> str:
    lines = []
    if threshold_rows:
        lks = sorted({r["lk"] for r in threshold_rows})
        lines += ["Split-KV decode against the plain forward: plain ms / split ms (> 1: split "
                  "wins); batch 8, 32/8 heads, d = 128, bf16.", "",
                  "| Lq | " + " | ".join(str(lk) for lk in lks) + " | split wins from |",
                  "|---|" + "---|" * (len(lks) + 1)]
        found = split_thresholds(threshold_rows)
        for lq in sorted(found):
            cells = []
            for lk in lks:
                r = next((r for r in threshold_rows if r["lq"] == lq and r["lk"] == lk), None)
                ok = r is not None and r.get("split_ms") and r.get("plain_ms")
                cells.append(_fmt(r["plain_ms"] / r["split_ms"], 2) if ok else "-")
            timed = any(c != "-" for c in cells)
            verdict = found[lq] or ("never" if timed else "not measured")
            lines.append(f"| {lq} | " + " | ".join(cells) + f" | {verdict} |")
        lines += ["", threshold_rule(found, timed_lqs(threshold_rows))]
    if rank_rows:
        providers = [p for p in RANK_PROVIDERS if any(r["provider"] == p for r in rank_rows)]
        lines += ["", "auto's CUDA order: milliseconds per call (bf16, d = 128).", "",
                  "| call | mode | " + " | ".join(providers) + " | fastest first | "
                  "triton / best other |", "|---|---|" + "---|" * (len(providers) + 2)]
        for rk in ranking(rank_rows):
            ms = {r["provider"]: r.get("ms") for r in rank_rows
                  if r["kind"] == rk["kind"] and r["mode"] == rk["mode"]}
            lines.append(f"| {rk['kind']} | {rk['mode']} | "
                         + " | ".join(_fmt(ms.get(p)) for p in providers)
                         + f" | {', '.join(rk['order'])} | {_fmt(rk['triton_vs_best_other'], 2)} |")
        errors = sorted({f"- {r['provider']} {r['kind']} {r['mode']}: {r['error']}"
                         for r in rank_rows if r.get("error")})
        if errors:
            lines += ["", "Not measured:", *errors]
    return "\n".join(lines) + "\n"


# ---- measuring -------------------------------------------------------------------------------

@contextlib.contextmanager
def decode_path(split: bool):
    """Force the triton forward onto split-KV decode (split) or the plain kernel (not split),
    for calls the decode kernels can take; counts the split launches in the yielded list."""
    from qkv.attention.triton import function, kernels_decode

    real_min, real_fn = function.DECODE_MIN_LK, kernels_decode.decode_forward
    launches = []

    def counted(*args, **kwargs):
        launches.append(1)
        return real_fn(*args, **kwargs)

    function.DECODE_MIN_LK = 0 if split else 1 << 62
    kernels_decode.decode_forward = counted
    try:
        yield launches
    finally:
        function.DECODE_MIN_LK, kernels_decode.decode_forward = real_min, real_fn


def _timer():
    from qkv.bench.gpu import _bench

    return lambda fn: _bench(fn, reps=1)


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


def threshold_rows(lqs=LQS, lks=LKS, *, batch=8, heads=32, kv_heads=8, head_dim=128,
                   dtype=torch.bfloat16, device="cuda", timer=None) -> list[dict]:
    """Time the triton forward both ways at each (Lq, Lk); `split_used` says whether the split
    timing really ran the decode kernels."""
    import qkv

    timer = timer or _timer()
    rows = []
    for lq in lqs:
        for lk in lks:
            row = dict(lq=lq, lk=lk, split_ms=None, plain_ms=None, split_used=False, error=None)
            try:
                q = torch.randn(batch, heads, lq, head_dim, device=device, dtype=dtype)
                k, v = (torch.randn(batch, kv_heads, lk, head_dim, device=device, dtype=dtype)
                        for _ in range(2))

                def fn(q=q, k=k, v=v):
                    return qkv.attention(q, k, v, causal=True, backend="triton")
                for split in (True, False):
                    with decode_path(split) as launches:
                        row["split_ms" if split else "plain_ms"] = timer(fn)
                    row["split_used"] = row["split_used"] or (split and bool(launches))
            except Exception as exc:  # recorded, not fatal: the other points still run
                row["error"] = _error(exc)
            rows.append(row)
    return rows


def _call_inputs(kind: str, device, dtype, scale: int = 1):
    """q, k, v and keywords of a call kind; `scale` divides batch, heads and lengths (tests)."""
    B, Hq, Hk, Lq, Lk, kw = CALL_KINDS[kind]
    B, Hq, Hk = max(1, B // scale), max(1, Hq // scale), max(1, Hk // scale)
    Lq, Lk = max(1, Lq // scale), max(1, Lk // scale)
    d = max(16, 128 // scale)
    q = torch.randn(B, Hq, Lq, d, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, Hk, Lk, d, device=device, dtype=dtype, requires_grad=True)
            for _ in range(2))
    kw = dict(kw)
    if kw.get("window"):
        kw["window"] = tuple(None if w is None else max(1, w // scale) for w in kw["window"])
    if kw.get("kv_lengths") == "random":
        kw["kv_lengths"] = torch.randint(Lk // 2, Lk + 1, (B,), device=device)
    if kw.get("bias") == "heads":
        kw["bias"] = torch.randn(1, Hq, Lq, Lk, device=device, dtype=dtype)
    if kw.get("alibi_slopes") == "heads":
        kw["alibi_slopes"] = 2.0 ** -torch.arange(1, Hq + 1, device=device, dtype=torch.float32)
    return (q, k, v), kw


def _provider_fn(provider: str, q, k, v, kw):
    import qkv

    if ":" not in provider:
        return lambda: qkv.attention(q, k, v, backend=provider, **kw)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from qkv.bench import SDPA_PROVIDERS

    kernel = getattr(SDPBackend, SDPA_PROVIDERS["sdpa-" + provider.split(":")[1]])

    def run():
        with sdpa_kernel(kernel):
            return qkv.attention(q, k, v, backend="sdpa", **kw)
    return run


def rank_rows(kinds=tuple(CALL_KINDS), providers=RANK_PROVIDERS, *, dtype=torch.bfloat16,
              device="cuda", timer=None, scale: int = 1) -> list[dict]:
    """Forward and (except decode) forward+backward of each call kind on each provider."""
    timer = timer or _timer()
    rows = []
    for kind in kinds:
        (q, k, v), kw = _call_inputs(kind, device, dtype, scale)
        modes = ("fwd",) if CALL_KINDS[kind][3] == 1 else ("fwd", "fwd_bwd")
        dout = torch.randn(q.shape[:-1] + v.shape[-1:], device=device, dtype=dtype)
        for provider in providers:
            fn = _provider_fn(provider, q, k, v, kw)
            for mode in modes:
                row = dict(kind=kind, provider=provider, mode=mode, ms=None, error=None)
                try:
                    if mode == "fwd":
                        with torch.no_grad():
                            row["ms"] = timer(fn)
                    else:
                        def step(fn=fn, leaves=(q, k, v), dout=dout):
                            for t in leaves:
                                t.grad = None
                            fn().backward(dout)
                        row["ms"] = timer(step)
                except Exception as exc:
                    row["error"] = _error(exc)
                rows.append(row)
    return rows


def warm_tasks() -> list[tuple[str, object]]:
    """Every triton call the sweep and this script time, as (name, thunk): run once, untimed."""
    from qkv.bench import gpu

    once = lambda fn: fn()  # noqa: E731
    tasks = []
    for d in gpu.HEAD_DIMS:
        for causal in (False, True):
            tasks.append((f"sweep d={d} causal={causal}", lambda d=d, causal=causal:
                          gpu.bench_training("qkv-triton", d, 1024, causal, reps=1)))
    tasks.append(("sweep decode", lambda: gpu.bench_decode("qkv-triton", 8192, 0.0, reps=1)))
    for lq in LQS:
        tasks.append((f"threshold Lq={lq}", lambda lq=lq: threshold_rows((lq,), LKS, timer=once)))
    for kind in CALL_KINDS:
        tasks.append((f"rank {kind}", lambda kind=kind: rank_rows((kind,), ("triton",),
                                                                  timer=once)))
    return tasks


def warm(share: int, shares: int) -> int:
    """Run the `share`-th of `shares` of the warm tasks; the number that failed."""
    failed = 0
    for i, (name, task) in enumerate(warm_tasks()):
        if i % shares != share:
            continue
        t = time.perf_counter()
        try:
            result = task()
            errors = [r["error"] for r in (result if isinstance(result, list) else [result])
                      if isinstance(r, dict) and r.get("error")]
        except Exception as exc:
            errors = [_error(exc)]
        failed += bool(errors)
        print(f"warm {name}: {time.perf_counter() - t:.1f} s"
              + (f" ERROR {errors[0]}" if errors else ""), flush=True)
    return failed


def write(out_dir, thresholds: list[dict], ranks: list[dict], env: dict | None = None) -> str:
    from qkv.io import atomic_write_text

    md = markdown(thresholds, ranks)
    out = Path(out_dir)
    found = split_thresholds(thresholds)
    atomic_write_text(out / "gpu_tuning.json", json.dumps(
        {"environment": env or {}, "threshold": thresholds, "ranking": ranks,
         "split_wins_from": {str(k): v for k, v in found.items()},
         "rule": threshold_rule(found, timed_lqs(thresholds)) if thresholds else None},
        indent=1))
    atomic_write_text(out / "gpu_tuning.md", md)
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--quick", action="store_true", help="fewer Lq and Lk")
    ap.add_argument("--warm", metavar="I/N", help="compile the I-th of N shares, time nothing")
    ap.add_argument("--skip-ranking", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: gpu_tuning.py needs CUDA", file=sys.stderr)
        return 1
    if args.warm:
        share, shares = (int(x) for x in args.warm.split("/"))
        return 1 if warm(share, shares) else 0
    from qkv.bench.gpu import environment

    Path(args.out).mkdir(parents=True, exist_ok=True)
    env = environment()
    lqs, lks = (QUICK_LQS, QUICK_LKS) if args.quick else (LQS, LKS)
    thresholds = threshold_rows(lqs, lks)
    print(write(args.out, thresholds, [], env), flush=True)  # kept if ranking is cut short
    ranks = [] if args.skip_ranking else rank_rows()
    print(write(args.out, thresholds, ranks, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
