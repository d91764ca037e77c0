"""Row `cost`: what one layer of each kind costs as the sequence grows, and how many steps it
must take one after another.

One causal attention layer (qkv's MultiHeadAttention on the `reference` backend, which holds
the n x n scores, and on `chunked`, which does not), one torch.nn.LSTM layer and one TCN block
(kernel 3): forward+backward time (median of a few runs) and peak memory against n at d = 128,
and time against d at n = 1024, batch 1. Each case runs in a fresh process so that its peak
resident memory is its own (the growth of the high-water mark above what the process held
before the first call); a case predicted to pass the memory budget is skipped and says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from qkv.bench.memory import fresh_processes
from qkv.compare.core import SIZED, Context, Row, RowResult, markdown_table
from qkv.compare.measure import (
    SMALLEST_N,
    THREADS,
    WARMUP_BELOW,
    doubling,
    loglog_figure,
    loglog_slope,
    run_elsewhere,
    threads,
    timed_runs,
)

KINDS = ("reference", "chunked", "lstm", "tcn")
LABELS = {"reference": "attention (reference)", "chunked": "attention (chunked)",
          "lstm": "LSTM", "tcn": "TCN block"}
D_FIXED, N_FIXED, QUICK_N_FIXED = 128, 1024, 512
FULL_DS, QUICK_DS = (64, 128, 256, 512, 1024), (64, 128, 256)
LINEAR_FLOATS = 40  # floats per token and channel a layer may hold in fwd+bwd (measured 4-15)


# ---- the layers -----------------------------------------------------------------------------

def n_heads(d: int) -> int:
    """Heads of width 64 (one head below d = 64)."""
    return max(1, d // 64)


def build_layer(kind: str, d: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """One layer of `kind` as a function (1, n, d) -> (1, n, d), causal."""
    from qkv.nn import AttentionConfig, MultiHeadAttention
    from qkv.nn.baselines import TCNBlock

    if kind in ("reference", "chunked"):
        attention = MultiHeadAttention(AttentionConfig(d_model=d, n_heads=n_heads(d),
                                                       backend=kind))
        return lambda x: attention(x, causal=True)
    if kind == "lstm":
        lstm = torch.nn.LSTM(d, d, batch_first=True)
        return lambda x: lstm(x)[0]
    if kind == "tcn":
        return TCNBlock(d, 3, dilation=1)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


@dataclass(frozen=True)
class LayerCase:
    kind: str
    n: int
    d: int
    reps: int = 3
    memory: bool = True

    @property
    def warmup(self) -> bool:
        return predicted_bytes(self) < WARMUP_BELOW


def predicted_bytes(case: LayerCase) -> int:
    """A generous guess of the case's peak memory: the reference's six n x n fp32 matrices per
    head (scores, weights and their gradients, and temporaries), plus linear activations."""
    quadratic = 6 * n_heads(case.d) * case.n**2 * 4 if case.kind == "reference" else 0
    return quadratic + LINEAR_FLOATS * case.n * case.d * 4


def measure_layer(case: LayerCase) -> dict:
    """Time (and, with case.memory, the peak memory of) forward+backward of one layer here."""
    torch.manual_seed(0)  # the same weights and inputs in every process
    layer = build_layer(case.kind, case.d)
    x = torch.randn(1, case.n, case.d, requires_grad=True)
    grad = torch.randn(1, case.n, case.d)

    def step():
        x.grad = None
        layer(x).backward(grad)

    with threads():
        return {**asdict(case), **timed_runs(step, case.reps, memory=case.memory,
                                                 warmup=case.warmup),
                "threads": torch.get_num_threads()}


# ---- counting -------------------------------------------------------------------------------

def lstm_flops(n: int, d_in: int, hidden: int) -> float:
    """Matmul FLOPs of one LSTM layer's forward pass, batch 1: at each of the n steps the four
    gates multiply the input (d_in) and the previous hidden state (hidden) by their weights:
    2 * 4 * hidden * (d_in + hidden) per step."""
    return 2.0 * 4 * hidden * (d_in + hidden) * n


def attention_layer_flops(n: int, d: int, heads: int) -> float:
    """Matmul FLOPs of one causal self-attention layer's forward pass, batch 1: the q, k, v and
    output projections (2 * 4 * d^2 per token) and attention itself (qkv.attention.flops)."""
    from qkv.attention.flops import attention_flops

    return 8.0 * n * d * d + attention_flops(1, heads, n, n, d // heads, causal=True)


def flop_overtake_n(d: int, heads: int) -> float:
    """The n above which one attention layer's forward FLOPs exceed one LSTM layer's (width d):
    attention is a*n^2 + b*n and the LSTM c*n, so they meet at n = (c - b) / a."""
    a = attention_layer_flops(2, d, heads) / 2 - attention_layer_flops(1, d, heads)
    b = attention_layer_flops(1, d, heads) - a
    c = lstm_flops(1, d, d)
    return max(0.0, (c - b) / a)


def sequential_steps(kind: str, n: int) -> int:
    """Operations that must run one after another to produce the last output: 1 for attention,
    the blocks whose receptive field covers n for the TCN, n for the LSTM."""
    from qkv.nn.baselines import TCNConfig

    if kind == "lstm":
        return n
    if kind == "tcn":
        return TCNConfig(vocab_size=2, kernel_size=3, max_len=n).depth
    return 1


def min_memory(settings) -> int:
    """The smallest case's predicted bytes (the runner refuses a budget below it)."""
    return min(predicted_bytes(LayerCase(kind, SMALLEST_N, QUICK_DS[0])) for kind in KINDS)


def run(ctx: Context) -> RowResult:
    from qkv.bench.cpu import machine_memory_bytes

    reps, memory = (1, False) if ctx.quick else (3, True)
    cap = min(ctx.settings.memory_budget, 0.8 * machine_memory_bytes())
    ns = doubling(SMALLEST_N, ctx.settings.longest)
    ds, n_fixed = (QUICK_DS, QUICK_N_FIXED) if ctx.quick else (FULL_DS, N_FIXED)
    n_fixed = min(n_fixed, ns[-1])
    cases = ([LayerCase(k, n, D_FIXED, reps, memory) for n in ns for k in KINDS]
             + [LayerCase(k, n_fixed, d, reps, memory) for d in ds for k in KINDS])
    rows = []
    with fresh_processes(["qkv.compare.cost"]) if memory else contextlib.nullcontext() as pool:
        for i, case in enumerate(cases):
            ctx.progress(f"{LABELS[case.kind]}, n={case.n}, d={case.d}", i, len(cases))
            if predicted_bytes(case) > cap:
                rows.append({**asdict(case), "skipped": f"predicted memory "
                             f"{predicted_bytes(case) / 2**30:.1f} GiB is over the "
                             f"{cap / 2**30:.1f} GiB cap"})
            else:
                rows.append(run_elsewhere(measure_layer, case, pool))
    ctx.progress("plots", len(cases), len(cases))
    return _result(ctx, rows, ns, ds, n_fixed, memory)


# ---- the report -----------------------------------------------------------------------------

def _series(rows, key: str, *, d: int | None = None, n: int | None = None) -> dict:
    """{kind: {size: value}} of the measured rows at fixed d (against n) or fixed n."""
    out = {kind: {} for kind in KINDS}
    for r in rows:
        if "skipped" not in r and (d is None or r["d"] == d) and (n is None or r["n"] == n):
            out[r["kind"]][r["n"] if d is not None else r["d"]] = r[key]
    return out


def _cell(values: dict, size: int, scale: float) -> float | str:
    return values[size] * scale if values.get(size) is not None else "skipped"


def _first_slower(attn: dict, lstm: dict, ns: list[int]) -> int | None:
    """The first n at which attention's time passes the LSTM's (None if it never does)."""
    return next((n for n in ns if n in attn and n in lstm and attn[n] > lstm[n]), None)


def _ratio(values: dict, low: int, high: int) -> float | None:
    if values.get(low) and values.get(high):
        return values[high] / values[low]
    return None


def _result(ctx: Context, rows: list[dict], ns: list[int], ds: tuple, n_fixed: int,
            memory: bool) -> RowResult:
    times = _series(rows, "seconds", d=D_FIXED)
    peaks = _series(rows, "peak_bytes", d=D_FIXED) if memory else None
    by_d = _series(rows, "seconds", n=n_fixed)
    slopes = {kind: {"time_vs_n": loglog_slope(ns, [times[kind].get(n) for n in ns]),
                     "memory_vs_n": loglog_slope(ns, [peaks[kind].get(n) for n in ns])
                     if memory else None,
                     "time_vs_d": loglog_slope(ds, [by_d[kind].get(d) for d in ds])}
              for kind in KINDS}
    steps = {kind: {n: sequential_steps(kind, n) for n in ns} for kind in KINDS}
    overtake = flop_overtake_n(D_FIXED, n_heads(D_FIXED))
    crossing = {kind: _first_slower(times[kind], times["lstm"], ns)
                for kind in ("reference", "chunked")}
    ratios = {kind: _ratio(peaks[kind], 1024, 4096) if memory else None for kind in KINDS}
    figures = _figures(ctx, times, peaks, by_d, ns, ds, n_fixed, overtake)
    tables = _tables(times, peaks, by_d, slopes, steps, ns, ds, n_fixed)
    data = {"rows": rows, "ns": ns, "ds": list(ds), "d_fixed": D_FIXED,
            "n_fixed": n_fixed, "slopes": slopes,
            "sequential_steps": {k: {str(n): v for n, v in s.items()} for k, s in steps.items()},
            "flop_overtake_n": overtake, "time_crossing_n": crossing,
            "memory_ratio_1k_to_4k": ratios, "memory_measured": memory}
    return _verdict(ns, slopes, steps, overtake, crossing, ratios, memory, tables, figures, data)


def _tables(times, peaks, by_d, slopes, steps, ns, ds, n_fixed) -> list[str]:
    head = [LABELS[k] for k in KINDS]
    tables = [f"*Forward+backward time of one layer against n (d = {D_FIXED}, batch 1, "
              f"{THREADS} thread; median of up to 3 runs).*\n\n" + markdown_table(
                  ["n", *(f"{h} time (ms)" for h in head)],
                  [[n, *(_cell(times[k], n, 1e3) for k in KINDS)] for n in ns])]
    if peaks is not None:
        tables.append("*Peak resident memory above the baseline, each case in a fresh "
                      "process.*\n\n" + markdown_table(
                          ["n", *(f"{h} peak memory (MiB)" for h in head)],
                          [[n, *(_cell(peaks[k], n, 2**-20) for k in KINDS)] for n in ns]))
    else:
        tables.append("Memory is not measured in quick mode (every case runs in one process).")
    tables.append("*Operations that must run one after another, and forward FLOPs.*\n\n"
                  + markdown_table(
                      ["n", "sequential steps: attention", "TCN (blocks)", "LSTM",
                       "attention layer GFLOP (fwd)", "LSTM layer GFLOP (fwd)"],
                      [[n, steps["chunked"][n], steps["tcn"][n], steps["lstm"][n],
                        attention_layer_flops(n, D_FIXED, n_heads(D_FIXED)) / 1e9,
                        lstm_flops(n, D_FIXED, D_FIXED) / 1e9] for n in ns]))
    tables.append(f"*Time against the width d at n = {n_fixed}.*\n\n" + markdown_table(
        ["d", *(f"{h} time (ms)" for h in head)],
        [[d, *(_cell(by_d[k], d, 1e3) for k in KINDS)] for d in ds]))
    tables.append("*Log-log slopes, fitted over the upper half of the points.*\n\n"
                  + markdown_table(
                      ["layer", "time slope vs n", "memory slope vs n", "time slope vs d"],
                      [[LABELS[k], slopes[k]["time_vs_n"], slopes[k]["memory_vs_n"],
                        slopes[k]["time_vs_d"]] for k in KINDS]))
    return tables


def _figures(ctx, times, peaks, by_d, ns, ds, n_fixed, overtake) -> list[str]:
    names = []
    fig, ax = loglog_figure({LABELS[k]: (ns, [times[k].get(n) for n in ns]) for k in KINDS},
                            xlabel="sequence length n (tokens)",
                            ylabel="forward+backward time (s)",
                            title=f"One layer, d = {D_FIXED}, batch 1, {THREADS} thread")
    if ns[0] <= overtake <= ns[-1]:
        ax.axvline(overtake, color="grey", linestyle="--",
                   label=f"attention FLOPs pass LSTM's (n={overtake:.0f})")
        ax.legend()
    names.append(ctx.save_figure(fig, "cost_time_vs_n.png"))
    if peaks is not None:
        fig, _ = loglog_figure(
            {LABELS[k]: (ns, [None if peaks[k].get(n) is None else peaks[k][n] / 2**20
                              for n in ns]) for k in KINDS},
            xlabel="sequence length n (tokens)", ylabel="peak memory above baseline (MiB)",
            title=f"One layer, forward+backward, d = {D_FIXED}")
        names.append(ctx.save_figure(fig, "cost_memory_vs_n.png"))
    fig, _ = loglog_figure({LABELS[k]: (list(ds), [by_d[k].get(d) for d in ds]) for k in KINDS},
                           xlabel="model width d", ylabel="forward+backward time (s)",
                           title=f"One layer, n = {n_fixed}, batch 1, {THREADS} thread")
    names.append(ctx.save_figure(fig, "cost_time_vs_d.png"))
    return names


def _crossing_text(label: str, n: int | None, ns: list[int]) -> str:
    if n is None:
        return f"{label} stays faster than the LSTM up to n = {ns[-1]}"
    if n == ns[0]:
        return f"{label} is slower than the LSTM from the shortest n ({n}) on"
    return f"{label} becomes slower than the LSTM at n = {n}"


def _slope_text(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _verdict(ns, slopes, steps, overtake, crossing, ratios, memory, tables, figures,
             data) -> RowResult:
    longest = ns[-1]
    t = {k: _slope_text(slopes[k]["time_vs_n"]) for k in KINDS}
    cross = "; ".join(_crossing_text(LABELS[k], crossing[k], ns) for k in ("reference", "chunked"))
    findings = (f"Fitted over the longer half of n, one layer's time grows as "
                f"n^{t['reference']} (reference attention), n^{t['chunked']} (chunked), "
                f"n^{t['lstm']} (LSTM) and n^{t['tcn']} (TCN block); at n = {longest} "
                f"attention takes 1 sequential step, the TCN {steps['tcn'][longest]} blocks and "
                f"the LSTM {longest} steps. By the "
                f"FLOP count one attention layer passes one LSTM layer at n = {overtake:.0f} "
                f"(4d at d = {D_FIXED}); measured, {cross}.")
    anchor = ("Long Range Arena (Tay et al., ICLR 2021), Table 2: 4x the length (1K to 4K) "
              "costs the vanilla Transformer about 11x the peak memory.")
    ref, chunked = ratios["reference"], ratios["chunked"]
    if ref is not None and chunked is not None:
        findings += (f" From n = 1024 to 4096 the reference layer's peak memory grows "
                     f"{ref:.1f}x and the chunked layer's {chunked:.1f}x, beside LRA's about 11x.")
    elif not memory:
        findings += " Memory is not measured in quick mode."
    skipped = [f"{LABELS[r['kind']]} at n={r['n']}, d={r['d']}" for r in data["rows"]
               if "skipped" in r]
    if skipped:
        findings += (f" Skipped as predicted to pass the memory cap: {', '.join(skipped)}.")
    quadratic = (slopes["reference"]["time_vs_n"] or 0) >= 1.5
    linear = (slopes["lstm"]["time_vs_n"] or 9) <= 1.25
    if longest < 4096:
        agrees = None
        findings += (f" With n only up to {longest} the quadratic term has not taken over, so "
                     "this run gives no verdict.")
    else:
        agrees = quadratic and linear and (ref is None or (ref >= 8 and (chunked or 0) <= 6))
        if not agrees:
            findings += (" This disagrees with the claim: the reference layer's time or memory "
                         "does not grow quadratically, or the LSTM's time not linearly.")
    headline = (f"time slope vs n: reference {t['reference']}, chunked {t['chunked']}, LSTM "
                f"{t['lstm']}, TCN {t['tcn']}; sequential steps at n={longest}: 1 / "
                f"{steps['tcn'][longest]} / {longest}; FLOPs cross at n={overtake:.0f}")
    if ref is not None and chunked is not None:
        headline += f"; memory 1K→4K: reference {ref:.1f}x, chunked {chunked:.1f}x (LRA ≈11x)"
    return RowResult(
        claim=("Attention trades quadratic cost in n for parallelism: its time (and the naive "
               "kernel's memory) grows as n^2 but it takes one sequential step, while the LSTM "
               "grows linearly and needs n steps, and the TCN needs log n blocks."),
        anchor=anchor, findings=findings, agrees=agrees, headline=headline, tables=tables,
        figures=figures, data=data)


# Every case seeds a fixed 0 (measure_layer), so --seed does not change this row.
ROW = Row(name="cost", title="Cost and parallelism", run=run, minutes=5.0, depends_on=SIZED)
