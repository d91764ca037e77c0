"""The FlashAttention GPU sweep: qkv's triton backend beside torch SDPA, in one process.

Training shapes follow FlashAttention's papers: batch·seqlen = 16k, heads·head_dim = 2048, head
dim 64 and 128, n = 512..16k, causal and not; forward, backward and forward+backward TFLOP/s
(`qkv.attention.flops.attention_flops`). Decode shapes: one query, 32 query heads over 8 K/V
heads, d = 128, batch 8, caches of 8k..131k keys; GB/s of K and V read
(`qkv.attention.flops.kv_cache_bytes`), also as a fraction of the device copy bandwidth
measured in the same run. Timing is `triton.testing.do_bench` (warm-up, then the median).

    PYTHONPATH=. python3 benchmarks/attention_gpu.py --out OUT [--quick]
    qkv bench --device cuda --out OUT [--quick]

Writes OUT/attention_gpu.json, OUT/attention_gpu.md and OUT/attention_gpu.png. The markdown
gives triton's ratio to cuDNN and to flash per point, and a table of the targets (`TARGETS`),
met or missed. Decode runs first, then d = 128 and d = 64, writing after each, so a run cut
short keeps what it measured. Only the measuring needs CUDA; the writers run anywhere (see
tests/bench/test_bench_gpu.py).
"""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from qkv.attention.flops import attention_flops, kv_cache_bytes
from qkv.bench import GPU_PROVIDERS, GPU_QUICK_SEQLENS, GPU_REPS, GPU_SEQLENS, SDPA_PROVIDERS
from qkv.io import atomic_write, atomic_write_text

HEAD_DIMS = [128, 64]  # measured in this order
DECODE_CACHES = [8192, 32768, 131072]
QUICK_DECODE_CACHES = [8192, 32768]
PROVIDERS = list(GPU_PROVIDERS)
MODES = ["fwd", "bwd", "fwd_bwd"]


# ---- measuring (CUDA) ------------------------------------------------------------------------

# Targets on an H200 in bf16 at d = 64 and 128 (issue 13): (what, mode, causal, baseline, ratio).
# Training targets hold at every n >= TARGET_MIN_SEQLEN; decode at every cache >= TARGET_MIN_CACHE.
TARGETS = [
    ("forward, non-causal", "fwd", False, "sdpa-cudnn", 0.90),
    ("forward, causal", "fwd", True, "sdpa-cudnn", 0.85),
    ("backward, non-causal", "bwd", False, "sdpa-flash", 1.20),
    ("backward, causal", "bwd", True, "sdpa-flash", 1.20),
    ("decode bandwidth", "decode", False, "sdpa-cudnn", 0.90),
]
TARGET_MIN_SEQLEN = 4096
TARGET_MIN_CACHE = 32768


def _bench(fn, grad_to_none=None, reps: int = GPU_REPS) -> float:
    """Median milliseconds of `fn`: the median of `reps` triton.testing.do_bench medians."""
    from triton.testing import do_bench

    return statistics.median(
        float(do_bench(fn, warmup=10, rep=40, grad_to_none=grad_to_none, return_mode="median"))
        for _ in range(reps))


def copy_bandwidth_gbps(device="cuda", nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read and written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _attention_fn(provider: str, causal: bool):
    """A callable (q, k, v) -> out for one provider."""
    import torch.nn.functional as F

    import qkv

    if provider == "qkv-triton":
        return lambda q, k, v: qkv.attention(q, k, v, causal=causal, backend="triton")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = getattr(SDPBackend, SDPA_PROVIDERS[provider])

    def run(q, k, v):
        with sdpa_kernel(kind):
            # Lq == Lk here, so torch's top-left causal equals qkv's bottom-right one.
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                  enable_gqa=q.shape[1] != k.shape[1])
    return run


def _row(**kw) -> dict:
    base = dict(kind="", provider="", mode="", head_dim=0, seqlen=0, causal=False, batch=0,
                heads=0, kv_heads=0, ms=None, tflops=None, gbps=None, frac_copy=None, error=None)
    base.update(kw)
    return base


def bench_training(provider: str, head_dim: int, seqlen: int, causal: bool,
                   dtype=torch.bfloat16, reps: int = GPU_REPS, device="cuda", tokens=16384,
                   width=2048) -> list[dict]:
    """Forward, backward and fwd+bwd of one (provider, d, n, causal) point: batch·n = `tokens`,
    heads·d = `width`."""
    batch, heads = max(1, tokens // seqlen), max(1, width // head_dim)
    shape = dict(kind="train", provider=provider, head_dim=head_dim, seqlen=seqlen,
                 causal=causal, batch=batch, heads=heads, kv_heads=heads)
    rows = []
    try:
        q, k, v = (torch.randn(batch, heads, seqlen, head_dim, device=device, dtype=dtype,
                               requires_grad=True) for _ in range(3))
        fn = _attention_fn(provider, causal)
        dout = torch.randn_like(q)
        times = {"fwd": _bench(lambda: fn(q, k, v), reps=reps)}
        out = fn(q, k, v)
        times["bwd"] = _bench(lambda: out.backward(dout, retain_graph=True),
                              grad_to_none=[q, k, v], reps=reps)
        times["fwd_bwd"] = _bench(lambda: fn(q, k, v).backward(dout), grad_to_none=[q, k, v],
                                  reps=reps)
    except Exception as exc:  # a provider that cannot run this shape is recorded, not fatal
        return [_row(**shape, mode=m, error=f"{type(exc).__name__}: {exc}"[:200]) for m in MODES]
    for mode, ms in times.items():
        flops = attention_flops(batch, heads, seqlen, seqlen, head_dim, causal=causal, mode=mode)
        rows.append(_row(**shape, mode=mode, ms=ms, tflops=flops / (ms * 1e-3) / 1e12))
    return rows


def bench_decode(provider: str, cache: int, copy_gbps: float, batch=8, heads=32, kv_heads=8,
                 head_dim=128, dtype=torch.bfloat16, reps: int = GPU_REPS, device="cuda") -> dict:
    """One decode step (q_len = 1) over a cache of `cache` keys."""
    shape = dict(kind="decode", provider=provider, mode="decode", head_dim=head_dim,
                 seqlen=cache, batch=batch, heads=heads, kv_heads=kv_heads)
    try:
        q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(batch, kv_heads, cache, head_dim, device=device, dtype=dtype)
                for _ in range(2))
        fn = _attention_fn(provider, False)
        ms = _bench(lambda: fn(q, k, v), reps=reps)
    except Exception as exc:
        return _row(**shape, error=f"{type(exc).__name__}: {exc}"[:200])
    nbytes = kv_cache_bytes(batch, kv_heads, cache, head_dim, q.element_size())
    gbps = nbytes / (ms * 1e-3) / 1e9
    return _row(**shape, ms=ms, gbps=gbps, frac_copy=gbps / copy_gbps if copy_gbps else None)


def environment() -> dict:
    """Versions and device, recorded beside the results."""
    import triton

    env = dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), python=platform.python_version(),
               torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
               gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    return env


# ---- writing (anywhere) ----------------------------------------------------------------------

def _fmt(x, digits=1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ratio(a, b):
    return a / b if a and b else None


def markdown_table(results: list[dict], targets: bool = True) -> str:
    """Training TFLOP/s per (d, causal, n, mode) with one column per provider and triton's ratio
    to the best SDPA kernel, to cuDNN and to flash; then decode; then the targets (unless
    `targets` is False)."""
    lines = []
    train = [r for r in results if r["kind"] == "train"]
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in results)]
    providers += sorted({r["provider"] for r in results} - set(providers))
    if train:
        lines += ["| d | causal | n | mode | " + " | ".join(providers)
                  + " | triton / best sdpa | / cudnn | / flash |",
                  "|---|---|---|---|" + "---|" * (len(providers) + 3)]
        keys = sorted({(r["head_dim"], r["causal"], r["seqlen"], r["mode"]) for r in train},
                      key=lambda t: (t[0], t[1], t[2], MODES.index(t[3]) if t[3] in MODES else 9))
        for d, causal, n, mode in keys:
            cell = {r["provider"]: r["tflops"] for r in train
                    if (r["head_dim"], r["causal"], r["seqlen"], r["mode"]) == (d, causal, n, mode)}
            others = [cell[p] for p in cell if p != "qkv-triton" and cell[p]]
            mine = cell.get("qkv-triton")
            ratios = (_ratio(mine, max(others, default=None)), _ratio(mine, cell.get("sdpa-cudnn")),
                      _ratio(mine, cell.get("sdpa-flash")))
            lines.append(f"| {d} | {'yes' if causal else 'no'} | {n} | {mode} | "
                         + " | ".join(_fmt(cell.get(p)) for p in providers)
                         + " | " + " | ".join(_fmt(x, 2) for x in ratios) + " |")
        lines.append("")
        lines.append("TFLOP/s (bf16); backward counts 2.5x the forward FLOPs, fwd_bwd 3.5x.")
    decode = [r for r in results if r["kind"] == "decode"]
    if decode:
        lines += ["", "| cache | " + " | ".join(f"{p} GB/s (of copy)" for p in providers)
                  + " | triton / cudnn |", "|---|" + "---|" * (len(providers) + 1)]
        for n in sorted({r["seqlen"] for r in decode}):
            cells, gbps = [], {}
            for p in providers:
                r = next((r for r in decode if r["seqlen"] == n and r["provider"] == p), None)
                gbps[p] = None if r is None else r["gbps"]
                cells.append("-" if gbps[p] is None
                             else f"{gbps[p]:.0f} ({_fmt(r['frac_copy'], 2)})")
            ratio = _ratio(gbps.get("qkv-triton"), gbps.get("sdpa-cudnn"))
            lines.append(f"| {n} | " + " | ".join(cells) + f" | {_fmt(ratio, 2)} |")
    rows = target_rows(results) if targets else []
    if any(r["status"] != "not measured" for r in rows):
        lines += ["", targets_markdown(rows).rstrip("\n")]
    errors = [r for r in results if r.get("error")]
    if errors:
        lines += ["", "Not measured:"]
        lines += sorted({f"- {r['provider']} d={r['head_dim']} n={r['seqlen']}: {r['error']}"
                         for r in errors})
    return "\n".join(lines) + "\n"


def target_rows(results: list[dict]) -> list[dict]:
    """Each target of `TARGETS` per head dim (decode: its one head dim): triton's ratio to the
    baseline at every size the target covers, the least of them, and met / missed."""
    rows = []
    for what, mode, causal, base, want in TARGETS:
        kind = "decode" if mode == "decode" else "train"
        floor = TARGET_MIN_CACHE if kind == "decode" else TARGET_MIN_SEQLEN
        dims = [128] if kind == "decode" else sorted(HEAD_DIMS)
        for d in dims:
            value = "gbps" if kind == "decode" else "tflops"
            points = {}
            for r in results:
                if (r["kind"] == kind and r["mode"] == mode and r["head_dim"] == d
                        and (kind == "decode" or r["causal"] == causal) and r["seqlen"] >= floor):
                    points.setdefault(r["seqlen"], {})[r["provider"]] = r.get(value)
            ratios = {n: _ratio(p.get("qkv-triton"), p.get(base))
                      for n, p in sorted(points.items())}
            ratios = {n: x for n, x in ratios.items() if x is not None}
            worst = min(ratios.values(), default=None)
            status = "not measured" if worst is None else "met" if worst >= want else "missed"
            rows.append(dict(what=what, head_dim=d, baseline=base, target=want, floor=floor,
                             ratios=ratios, worst=worst, status=status))
    return rows


def targets_markdown(rows: list[dict]) -> str:
    """The targets table: what, d, baseline, target, the least ratio (and every one), status."""
    lines = ["| target | d | against | sizes | want | triton's ratio (least) | per size | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = ", ".join(f"{n // 1024}k: {x:.2f}" for n, x in r["ratios"].items()) or "-"
        lines.append(f"| {r['what']} | {r['head_dim']} | {r['baseline']} | >= {r['floor'] // 1024}k"
                     f" | >= {r['target']:.2f}x | {_fmt(r['worst'], 2)} | {per} | {r['status']} |")
    return "\n".join(lines) + "\n"


def write_json(results: list[dict], path: Path, env: dict | None = None) -> None:
    atomic_write_text(path, json.dumps({"environment": env or {}, "results": results}, indent=1))


def write_plot(results: list[dict], path: Path) -> None:
    """Training TFLOP/s against n: one panel per (head dim, causal, mode), a line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in results if r["kind"] == "train" and r["tflops"]]
    panels = sorted({(r["head_dim"], r["causal"]) for r in train}) or [(0, False)]
    fig, axes = plt.subplots(len(panels), len(MODES), figsize=(4 * len(MODES), 3 * len(panels)),
                             squeeze=False)
    for i, (d, causal) in enumerate(panels):
        for j, mode in enumerate(MODES):
            ax = axes[i][j]
            for p in sorted({r["provider"] for r in train}):
                pts = sorted((r["seqlen"], r["tflops"]) for r in train if r["provider"] == p
                             and (r["head_dim"], r["causal"], r["mode"]) == (d, causal, mode))
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=p)
            ax.set_xscale("log", base=2)
            ax.set_title(f"d={d} {'causal' if causal else 'full'} {mode}", fontsize=9)
            ax.set_xlabel("n")
            ax.set_ylabel("TFLOP/s")
            if i == 0 and j == 0 and train:
                ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def write_all(results: list[dict], out_dir, env: dict | None = None) -> None:
    out = Path(out_dir)
    write_json(results, out / "attention_gpu.json", env)
    atomic_write_text(out / "attention_gpu.md", markdown_table(results))
    # The plot is optional: the reference GPU machine has no matplotlib.
    with contextlib.suppress(ImportError):
        write_plot(results, out / "attention_gpu.png")


# ---- the sweep -------------------------------------------------------------------------------

def run_gpu_sweep(out_dir=None, quick: bool = False, seqlens=None, providers=None,
                  reps: int = GPU_REPS) -> list[dict]:
    """Measure the whole sweep on the current CUDA device (decode, then training at each head
    dim); write JSON, markdown and PNG to `out_dir` (also after decode and after each (head dim,
    causal), so a run cut short keeps what it measured).

    `seqlens` (training shapes) and `providers` (a subset of PROVIDERS) default to the full
    sweep, or the quick one; `reps` do_bench medians are taken per point (their median kept).
    """
    providers = list(providers or PROVIDERS)
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        raise ValueError(f"unknown GPU provider(s) {unknown}; choose from {PROVIDERS}")
    if not torch.cuda.is_available():
        raise RuntimeError("run_gpu_sweep needs a CUDA device")
    env = environment()
    copy = copy_bandwidth_gbps()
    env["copy_gbps"] = copy
    results: list[dict] = []
    for cache in (QUICK_DECODE_CACHES if quick else DECODE_CACHES):
        for p in providers:
            results.append(bench_decode(p, cache, copy, reps=reps))
        torch.cuda.empty_cache()
    for d in HEAD_DIMS:
        for causal in (False, True):
            if out_dir is not None:
                write_all(results, out_dir, env)
            for n in seqlens or (GPU_QUICK_SEQLENS if quick else GPU_SEQLENS):
                for p in providers:
                    results += bench_training(p, d, n, causal, reps=reps)
                    torch.cuda.empty_cache()
    if out_dir is not None:
        write_all(results, out_dir, env)
    return results
