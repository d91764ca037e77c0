"""Row `scale`: attention is not free to scale.

One forward+backward of a whole model (DecoderLM: 4 layers, d_model 256, 4 heads, vocabulary
256, batch 1) against n, doubling from 256, on each CPU backend (reference, chunked, sdpa):
time, and peak memory measured in a fresh process. Before a case runs its memory is predicted,
and a case predicted to pass the budget is not run: it is the first "does not fit" point (no
case is ever run out of memory). The row marks where the quadratic term overtakes the linear
ones: where attention's score FLOPs pass the rest of the model's FLOPs, and where the n x n
matrices of `reference` pass the rest of the activations.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch

from qkv.bench.memory import fresh_processes
from qkv.compare.core import SIZED, Context, Row, RowResult, markdown_table
from qkv.compare.measure import (
    SMALLEST_N,
    THREADS,
    TIME_CAP,
    WARMUP_BELOW,
    doubling,
    loglog_figure,
    loglog_slope,
    run_elsewhere,
    threads,
    timed_runs,
)

BACKENDS = ("reference", "chunked", "sdpa")
VOCAB, D_MODEL, N_LAYERS, N_HEADS = 256, 256, 4, 4
# Predicted peak memory of one forward+backward (fp32, batch 1), fitted to measurements on
# this model and rounded up: bytes per token (the linear activations of every layer, the
# logits), and for `reference` bytes per n^2 (the score and weight matrices every layer keeps
# for the backward pass, and the backward's temporaries), plus the parameters' gradients.
# (Measured on 1 thread: 66 bytes per token, channel and layer, and 2.5 matrices per head and
# layer; the prediction is 1.2-1.5x that.)
LINEAR_BYTES_PER_TOKEN = 80 * D_MODEL * N_LAYERS
QUADRATIC_BYTES = 3 * N_HEADS * N_LAYERS * 4  # three fp32 n x n matrices per head and layer
TIME_BUDGET = {True: 5.0, False: 240.0}  # seconds for all backends: --quick, full
UNBOUNDED = 1 << 24  # where the predicted memory wall stops being sought


@dataclass(frozen=True)
class ModelCase:
    backend: str
    n: int
    reps: int = 2
    memory: bool = True
    warmup: bool = True


def model_config(backend: str, n: int):
    from qkv.nn import TransformerConfig

    return TransformerConfig(vocab_size=VOCAB, d_model=D_MODEL, n_layers=N_LAYERS,
                             n_heads=N_HEADS, max_len=n, backend=backend)


def parameter_bytes() -> int:
    from qkv.nn import DecoderLM

    return 4 * sum(p.numel() for p in DecoderLM(model_config("chunked", 8)).parameters())


def predicted_bytes(backend: str, n: int, params: int) -> int:
    """The memory a forward+backward is predicted to need above the model and its input."""
    quadratic = QUADRATIC_BYTES * n * n if backend == "reference" else 0
    return params + LINEAR_BYTES_PER_TOKEN * n + quadratic


def memory_wall(backend: str, budget: int, params: int) -> int | None:
    """The smallest doubling n (from 256) predicted not to fit `budget`; None below 2^24."""
    return next((n for n in doubling(SMALLEST_N, UNBOUNDED)
                 if predicted_bytes(backend, n, params) > budget), None)


def score_flops(n: int) -> float:
    """Forward FLOPs of attention itself (q k^T and the weighted sum of v), all layers."""
    from qkv.attention.flops import attention_flops

    return N_LAYERS * attention_flops(1, N_HEADS, n, n, D_MODEL // N_HEADS, causal=True)


def other_flops(n: int) -> float:
    """Forward matmul FLOPs of everything else: each layer's q, k, v and output projections
    (8 n d^2) and feed-forward (16 n d^2), and the output head (2 n d V)."""
    return N_LAYERS * 24.0 * n * D_MODEL**2 + 2.0 * n * D_MODEL * VOCAB


def flop_crossover() -> float:
    """The n where score FLOPs (a n^2) pass the rest (b n): n = b / a."""
    return other_flops(1) / score_flops(1)


def memory_crossover() -> float:
    """The n where reference's predicted n x n memory passes the linear activations."""
    return LINEAR_BYTES_PER_TOKEN / QUADRATIC_BYTES


def min_memory(settings) -> int:
    """The smallest case's predicted bytes (the runner refuses a budget below it)."""
    params = parameter_bytes()
    return min(predicted_bytes(b, SMALLEST_N, params) for b in BACKENDS)


def measure_model(case: ModelCase) -> dict:
    """Time and peak memory of one forward+backward of the model, here."""
    from qkv.nn import DecoderLM

    torch.manual_seed(0)
    model = DecoderLM(model_config(case.backend, case.n))
    idx = torch.randint(0, VOCAB, (1, case.n))
    targets = torch.roll(idx, -1, dims=1)

    def step():
        model.zero_grad(set_to_none=True)
        model(idx, targets)[1].backward()

    with threads():
        return {**asdict(case), **timed_runs(step, case.reps, memory=case.memory,
                                             warmup=case.warmup)}


def _guess_seconds(rows: list[dict], backend: str, reps: int, warmup: bool) -> float:
    """A case's predicted seconds: 4x the backend's last time (time grows at most as n^2),
    times the runs it will take."""
    last = [r["seconds"] for r in rows if r["backend"] == backend and "seconds" in r]
    if not last:
        return 0.0
    once = 4 * last[-1]
    return once * ((1 if once >= 2 * TIME_CAP else reps) + warmup)


def run(ctx: Context) -> RowResult:
    from qkv.bench.cpu import machine_memory_bytes

    budget = ctx.settings.memory_budget
    cap = min(budget, int(0.8 * machine_memory_bytes()))
    reps, memory = (1, False) if ctx.quick else (2, True)
    params = parameter_bytes()
    ns = doubling(SMALLEST_N, ctx.settings.longest)
    seconds_left = TIME_BUDGET[ctx.quick]
    rows: list[dict] = []
    stopped: set[str] = set()
    cases = [ModelCase(b, n, reps, memory, predicted_bytes(b, n, params) < WARMUP_BELOW)
             for n in ns for b in BACKENDS]
    with fresh_processes(["qkv.compare.scale"]) if memory else contextlib.nullcontext() as pool:
        for i, case in enumerate(cases):
            ctx.progress(f"{case.backend}, n={case.n}", i, len(cases))
            if case.backend in stopped:
                continue
            need = predicted_bytes(case.backend, case.n, params)
            row = {**asdict(case), "predicted_bytes": need, "fits": need <= cap}
            if need > cap:
                stopped.add(case.backend)
            elif _guess_seconds(rows, case.backend, reps, case.warmup) > seconds_left:
                stopped.add(case.backend)
                row["not_run"] = "over the row's time budget"
            else:
                row.update(run_elsewhere(measure_model, case, pool))
                seconds_left -= sum(row["times"]) + (row["seconds"] if case.warmup else 0)
            rows.append(row)
    ctx.progress("plots", len(cases), len(cases))
    return _result(ctx, rows, ns, params, budget, cap, memory)


# ---- the report -----------------------------------------------------------------------------

def _measured(rows, backend: str, key: str) -> dict[int, float]:
    return {r["n"]: r[key] for r in rows
            if r["backend"] == backend and r.get(key) is not None}


def _cell(rows, backend: str, n: int, key: str, scale: float):
    row = next((r for r in rows if r["backend"] == backend and r["n"] == n), None)
    if row is None:
        return "—"
    if not row["fits"]:
        return f"does not fit ({row['predicted_bytes'] / 2**30:.1f} GiB predicted)"
    if "not_run" in row:
        return "not run (time budget)"
    return row[key] * scale if row.get(key) is not None else "not measured"


def _last_doubling(times: dict[int, float]) -> float | None:
    """The log-log slope of time between the two longest sequences measured."""
    import math

    ns = sorted(times)
    if len(ns) < 2:
        return None
    return math.log(times[ns[-1]] / times[ns[-2]]) / math.log(ns[-1] / ns[-2])


def _figures(ctx, rows, ns, params, budget, flop_n, memory_n, memory) -> list[str]:
    time_series = {b: (ns, [_measured(rows, b, "seconds").get(n) for n in ns]) for b in BACKENDS}
    fig, ax = loglog_figure(time_series, xlabel="sequence length n (tokens)",
                            ylabel="forward+backward time (s)",
                            title=f"DecoderLM, {N_LAYERS} layers, d={D_MODEL}, batch 1, "
                                  f"{THREADS} thread")
    ax.axvline(flop_n, color="grey", linestyle="--",
               label=f"score FLOPs pass the rest (n={flop_n:.0f})")
    ax.legend(loc="lower right")
    names = [ctx.save_figure(fig, "scale_time.png")]
    series = ({f"{b} (measured)": (ns, [None if (v := _measured(rows, b, "peak_bytes").get(n))
                                        is None else v / 2**30 for n in ns])
               for b in BACKENDS} if memory else {})
    fig, ax = loglog_figure(series or {}, xlabel="sequence length n (tokens)",
                            ylabel="peak memory (GiB)",
                            title="Forward+backward memory against the budget")
    reach = doubling(SMALLEST_N, max(ns[-1], 2 * (memory_wall("reference", budget, params) or 0)))
    for color, (b, label) in zip(("C0", "C1"), (("reference", "reference"),
                                               ("chunked", "chunked and sdpa")), strict=True):
        ax.plot(reach, [predicted_bytes(b, n, params) / 2**30 for n in reach], linestyle=":",
                color=color, label=f"{label} (predicted)")
    wall = memory_wall("reference", budget, params)
    if wall is not None and wall <= reach[-1]:
        ax.plot([wall], [predicted_bytes("reference", wall, params) / 2**30], "x", color="red",
                markersize=10, label=f"reference does not fit (n={wall})")
    ax.axhline(budget / 2**30, color="red", label=f"budget {budget / 2**30:.3g} GiB")
    ax.axvline(memory_n, color="grey", linestyle="--",
               label=f"reference n x n memory passes the rest (n={memory_n:.0f})")
    ax.set_xticks(reach, [str(n) for n in reach])
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
    names.append(ctx.save_figure(fig, "scale_memory.png"))
    return names


def _result(ctx, rows, ns, params, budget, cap, memory) -> RowResult:
    flop_n, memory_n = flop_crossover(), memory_crossover()
    fits = {b: max([r["n"] for r in rows if r["backend"] == b and "seconds" in r], default=None)
            for b in BACKENDS}
    walls = {b: memory_wall(b, cap, params) for b in BACKENDS}
    slopes = {b: {"time": loglog_slope(ns, [_measured(rows, b, "seconds").get(n) for n in ns]),
                  "memory": loglog_slope(ns, [_measured(rows, b, "peak_bytes").get(n)
                                              for n in ns]) if memory else None,
                  "time_last_doubling": _last_doubling(_measured(rows, b, "seconds"))}
              for b in BACKENDS}
    ref, chunked = _measured(rows, "reference", "peak_bytes"), _measured(rows, "chunked",
                                                                         "peak_bytes")
    measured_memory_n = next((n for n in ns if n in ref and n in chunked
                              and ref[n] - chunked[n] > chunked[n]), None)
    caption = (f"*One forward+backward of the model ({N_LAYERS} layers, d = {D_MODEL}, "
               f"{N_HEADS} heads, vocabulary {VOCAB}, batch 1, {THREADS} thread): time, and "
               "peak memory in a fresh process.*\n\n")
    header = ["n", *(f"{b} time (s)" for b in BACKENDS), *(f"{b} peak (MiB)" for b in BACKENDS)]
    body = [[n, *(_cell(rows, b, n, "seconds", 1.0) for b in BACKENDS),
             *(_cell(rows, b, n, "peak_bytes", 2**-20) for b in BACKENDS)] for n in ns]
    tables = [caption + markdown_table(header, body)]
    caption = ("*Where each backend stops: the largest n run, and the first n whose predicted "
               "memory passes the budget.*\n\n")
    header = ["backend", "largest n run", "first n predicted not to fit", "time slope",
              "memory slope"]
    body = [[b, fits[b], walls[b], slopes[b]["time"], slopes[b]["memory"]] for b in BACKENDS]
    tables.append(caption + markdown_table(header, body))
    figures = _figures(ctx, rows, ns, params, budget, flop_n, memory_n, memory)
    text = {b: "—" if slopes[b]["time"] is None else f"{slopes[b]['time']:.2f}" for b in BACKENDS}
    last = {b: "—" if slopes[b]["time_last_doubling"] is None
            else f"{slopes[b]['time_last_doubling']:.2f}" for b in BACKENDS}
    findings = (f"With a {cap / 2**30:.3g} GiB budget the reference backend, which keeps n x n "
                f"matrices, is predicted not to fit from n = {walls['reference']}, while chunked "
                f"and sdpa are predicted not to fit only from n = {walls['chunked']} and "
                f"{walls['sdpa']}: the linear-memory kernels move the wall. Time grows as "
                f"n^{text['reference']} (reference), n^{text['chunked']} (chunked) and "
                f"n^{text['sdpa']} (sdpa) over the longer half of n, and over the last doubling "
                f"each ran as n^{last['reference']}, n^{last['chunked']} and n^{last['sdpa']}; "
                f"attention's score FLOPs "
                f"pass the rest of the model's at n = {flop_n:.0f}, and reference's n x n "
                f"memory passes the other activations at n = {memory_n:.0f} by the prediction")
    findings += (f" ({measured_memory_n} measured)." if measured_memory_n else ".")
    if not memory:
        findings += " Memory is not measured in quick mode; the walls are predicted."
    agrees = None
    if ns[-1] >= 4 * SMALLEST_N * 4 and memory:
        quad = (slopes["reference"]["memory"] or 0) >= 1.5
        lin = all((slopes[b]["memory"] or 9) <= 1.3 for b in ("chunked", "sdpa"))
        slow = all((slopes[b]["time"] or 0) >= 1.4 for b in ("chunked", "sdpa"))
        moved = all((walls[b] or UNBOUNDED) > (walls["reference"] or UNBOUNDED)
                    for b in ("chunked", "sdpa"))
        agrees = quad and lin and slow and moved
        if not agrees:
            findings += (" This disagrees with the claim in part: " + ", ".join(
                why for ok, why in ((quad, "reference's memory does not grow as n^2"),
                                    (lin, "a linear-memory kernel's memory grows faster"),
                                    (slow, "a linear-memory kernel's time does not grow as "
                                           "n^2 in this range"),
                                    (moved, "the wall does not move")) if not ok) + ".")
    else:
        findings += " The sizes of this run are too small for a verdict."
    headline = (f"{cap / 2**30:.3g} GiB: reference runs to n={fits['reference']}, predicted not "
                f"to fit from n={walls['reference']}; chunked / sdpa run to n={fits['chunked']} / "
                f"{fits['sdpa']}, predicted not to fit from n={walls['chunked']} / "
                f"{walls['sdpa']}; "
                f"time slope {text['chunked']} / {text['sdpa']}; score FLOPs pass the rest at "
                f"n={flop_n:.0f}")
    return RowResult(
        claim=("Attention is not free to scale: the memory of an exact naive implementation "
               "grows as n^2, and linear-memory kernels move the memory wall but their time "
               "still grows as n^2."),
        anchor=("Rabe & Staats (2021), 'Self-attention does not need O(n^2) memory', and "
                "FlashAttention (Dao et al., 2022): exact attention in O(n) memory, with the "
                "FLOPs still O(n^2)."),
        findings=findings, agrees=agrees, headline=headline, tables=tables, figures=figures,
        data={"rows": rows, "ns": ns, "memory_budget": budget, "memory_cap": cap,
              "parameter_bytes": params, "largest_n_run": fits, "predicted_wall": walls,
              "slopes": slopes, "flop_crossover_n": flop_n,
              "memory_crossover_n_predicted": memory_n,
              "memory_crossover_n_measured": measured_memory_n, "memory_measured": memory,
              "model": {"vocab_size": VOCAB, "d_model": D_MODEL, "n_layers": N_LAYERS,
                        "n_heads": N_HEADS}})


# Every case seeds a fixed 0 (measure_model), so --seed does not change this row.
ROW = Row(name="scale", title="Not free to scale", run=run, minutes=5.0, depends_on=SIZED)
