"""`qkv plan`: parameters, FLOPs, peak memory per attention backend, the longest sequence that
fits a memory budget, and a time estimate, before a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

PRESET_NAMES = ("demo, minilm, gpt2, gpt2-medium, gpt2-large, gpt2-xl, llama-1b, llama-8b, "
                "llama-70b")
ROWS = (("weights", "weights"), ("gradients", "gradients"), ("optimizer", "optimizer"),
        ("activations", "activations"), ("kv_cache", "KV cache"), ("attention", "attention"))


def plan(
    model: Annotated[str, typer.Option(help=f"a preset ({PRESET_NAMES}) or a `qkv train` "
                                            "config.toml")],
    seq_len: Annotated[int, typer.Option(help="tokens per sequence (decode: in the cache)")],
    batch: Annotated[int, typer.Option(min=1, help="sequences per step")] = 1,
    dtype: Annotated[str, typer.Option(help="fp32, bf16 or fp16 (train: autocast over fp32 "
                                            "weights)")] = "fp32",
    mode: Annotated[str, typer.Option(help="train (one AdamW step), prefill (one forward "
                                           "pass) or decode (one token against the cache)")]
        = "train",
    memory: Annotated[str | None, typer.Option(help="memory budget such as 24GiB or 80GB",
                                               show_default="the --device's memory")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda: the budget (unless --memory) "
                                                    "and where times are measured",
                                               show_default="cpu, no budget")] = None,
    bench: Annotated[Path | None, typer.Option(
        help="`qkv bench --out` results to calibrate the attention times from, when the file "
             "exists (not with --no-calibrate)", show_default="runs/bench/results.json")]
        = None,
    calibrate: Annotated[bool, typer.Option(help="measure throughput here (about a second); "
                                                 "--no-calibrate marks times uncalibrated")]
        = True,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
) -> None:
    """Plan one step of a model before running it: memory and time per attention backend."""
    from qkv.cli._errors import user_errors

    with user_errors():
        if bench is not None and not calibrate:
            raise typer.BadParameter("calibrates the times from a `qkv bench` file, which "
                                     "--no-calibrate turns off: give one of the two",
                                     param_hint="--bench")
        spec, budget, source, resolved = _inputs(model, seq_len, batch, dtype, mode, memory,
                                                 device)
        from qkv.plan import DEFAULT_BENCH_RESULTS, make_plan, rates_for

        rates = rates_for(spec, seq_len, batch, mode, dtype, resolved,
                          DEFAULT_BENCH_RESULTS if bench is None else bench, calibrate)
        result = make_plan(spec, seq_len, batch, dtype, mode, budget, source, rates,
                           resolved.type)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        typer.echo(render(result))


def _inputs(model, seq_len, batch, dtype, mode, memory, device):
    """Check the options; (spec, budget or None, budget's source, torch.device). A mistake is
    a typer.BadParameter naming the option."""
    from qkv.plan.memory import DTYPES, MODES

    checks = (("--seq-len", seq_len >= 1, f"must be at least 1, got {seq_len}"),
              ("--dtype", dtype in DTYPES, f"must be one of {list(DTYPES)}, got {dtype!r}"),
              ("--mode", mode in MODES, f"must be one of {list(MODES)}, got {mode!r}"))
    for hint, ok, message in checks:
        if not ok:
            raise typer.BadParameter(message, param_hint=hint)
    from qkv.device import resolve_device
    from qkv.plan import load_model
    from qkv.units import format_bytes, parse_bytes

    try:
        spec = load_model(model, seq_len)
    except (ValueError, OSError) as e:
        raise typer.BadParameter(str(e), param_hint="--model") from None
    if mode == "decode" and spec.kind != "decoder":
        raise typer.BadParameter(f"{spec.name} is an {spec.kind}: it has no decode mode",
                                 param_hint="--mode")
    try:
        resolved = resolve_device(device or "cpu")
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--device") from None
    if memory is not None:
        try:
            budget = parse_bytes(memory, "it")
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--memory") from None
        return spec, budget, f"--memory {memory} ({format_bytes(budget)})", resolved
    if device is None:
        return spec, None, None, resolved
    from qkv.train.config import device_memory

    found = device_memory(resolved)
    return spec, *(found if found else (None, None)), resolved


def _cell(value) -> str:
    from qkv.units import format_bytes

    return format_bytes(value) if value else "-"


def _count(x: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.3g}"


def _seconds(x: float) -> str:
    return f"{x * 1e3:.3g} ms" if x < 1 else f"{x:.3g} s" if x < 3600 else f"{x / 3600:.3g} h"


def render(p) -> str:
    """The plan as aligned plain text."""
    rows_of = "sequence" if p.batch == 1 else "sequences"
    what = {"train": "one AdamW step", "prefill": "one forward pass (no gradients)",
            "decode": "one decode step (one new token per sequence)"}[p.mode]
    lines = [f"{p.model} ({p.kind}), {p.mode}: {what} over {p.batch} {rows_of} of "
             f"{p.seq_len:,} tokens, {p.dtype}",
             f"parameters          {p.params:,}",
             f"FLOPs per token     {_count(p.flops_per_token['total'])}: attention "
             f"{_count(p.flops_per_token['attention'])} ({100 * p.attention_share:.1f}%), "
             f"everything else {_count(p.flops_per_token['linear'])}",
             f"attention's share passes half at n = {p.crossover_seq_len:,}",
             "budget              " + (p.budget_source or "none (give --memory or --device)"),
             ""]
    table = [("peak memory", [b.backend for b in p.backends])]
    for key, label in ROWS:
        if any(b.memory[key] for b in p.backends):
            table.append(("  " + label, [_cell(b.memory[key]) for b in p.backends]))
    table.append(("  total (peak)", [_cell(b.memory["total"]) for b in p.backends]))
    if p.budget is not None:
        table.append(("fits the budget", ["yes" if b.fits else "no" for b in p.backends]))
        table.append(("largest n that fits", [f"{b.max_seq_len:,}" for b in p.backends]))
    per = "token step" if p.mode == "decode" else "step"
    table.append((f"time per {per}", [_seconds(b.seconds) for b in p.backends]))
    width = max(12, *(len(c) + 2 for _, cells in table for c in cells))  # 2 spaces at least
    lines += [f"{label:<20}" + "".join(f"{c:>{width}}" for c in cells) for label, cells in table]
    s = p.suggestion
    lines += ["", f"suggested backend   {s['backend']} ({s['reason']}); block {s['block']}",
              f"times               {p.time_source}"]
    if p.mode == "train":
        lines.append("                    peak = weights + optimizer + max(activations + "
                     "attention, gradients)")
    lines += [f"note                {n}" for n in p.notes]
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)
