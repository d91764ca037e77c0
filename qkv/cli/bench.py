"""`qkv bench`: attention speed and memory beside torch, on the CPU or a CUDA GPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from qkv.bench import (
    CPU_BACKENDS,
    CPU_QUICK_SEQLENS,
    CPU_REPS,
    CPU_SEQLENS,
    GPU_PROVIDERS,
    GPU_QUICK_SEQLENS,
    GPU_REPS,
    GPU_SEQLENS,
)


def _sizes(ns) -> str:
    return f"{ns[0]}..{ns[-1]}" if len(ns) > 2 else ", ".join(str(n) for n in ns)


def bench(
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    quick: Annotated[bool, typer.Option(help="small sizes only (about a minute on a CPU)")] = False,
    out: Annotated[Path | None, typer.Option(
        help="folder for the results (JSON and markdown; a PNG on CUDA)", show_default="none")]
        = None,
    reps: Annotated[int | None, typer.Option(
        min=1, show_default=f"{CPU_REPS} on the CPU, {GPU_REPS} on CUDA",
        help="timed repetitions per case, the median kept (CUDA: do_bench medians)")] = None,
    n: Annotated[list[int] | None, typer.Option(
        "--n", min=1, show_default=f"CPU {_sizes(CPU_SEQLENS)} (--quick {_sizes(CPU_QUICK_SEQLENS)}"
        f"), CUDA {_sizes(GPU_SEQLENS)} (--quick {_sizes(GPU_QUICK_SEQLENS)})",
        help="sequence lengths (repeatable)")] = None,
    backend: Annotated[list[str] | None, typer.Option(
        "--backend", show_default="all",
        help=f"repeatable; CPU: {', '.join(CPU_BACKENDS)}; CUDA: {', '.join(GPU_PROVIDERS)}")]
        = None,
    memory: Annotated[bool, typer.Option(
        help="CPU: measure peak memory too, each case in a fresh process; --no-memory times "
             "every case in this process, much sooner")] = True,
) -> None:
    """Time qkv's attention backends beside torch SDPA, in the same process, and print a table."""
    from qkv.cli._errors import user_errors
    from qkv.cli._files import check_writable_folder

    with user_errors():
        from qkv.device import resolve_device

        resolved = resolve_device(device)
        kind = resolved.type
        if kind not in ("cpu", "cuda"):
            raise typer.BadParameter(f"must be auto, cpu or cuda, got {device!r}",
                                     param_hint="--device")
        choices = CPU_BACKENDS if kind == "cpu" else GPU_PROVIDERS
        unknown = sorted(set(backend or ()) - set(choices))
        if unknown:
            raise typer.BadParameter(f"unknown {unknown} on {kind}; choose from {list(choices)}",
                                     param_hint="--backend")
        if out is not None:
            check_writable_folder(out)
        if kind == "cuda":
            _bench_gpu(resolved, quick, out, reps, n, backend)
        else:
            _bench_cpu(quick, out, reps, n, backend, memory)


def _bench_gpu(device, quick, out, reps, n, backend) -> None:
    import torch

    from qkv.bench import gpu  # needs triton and a GPU

    if device.index is not None:  # the sweep measures on the current CUDA device
        torch.cuda.set_device(device)

    results = gpu.run_gpu_sweep(out, quick=quick, seqlens=n or None, providers=backend or None,
                                reps=reps or GPU_REPS)
    typer.echo(gpu.markdown_table(results))
    if out is not None:
        typer.echo(f"wrote attention_gpu.json, .md and .png under {out}")


def _bench_cpu(quick, out, reps, n, backend, memory) -> None:
    from rich.console import Console
    from rich.progress import Progress

    from qkv.bench import cpu
    from qkv.io import atomic_write_text

    ns = tuple(n) if n else CPU_QUICK_SEQLENS if quick else CPU_SEQLENS
    backends = tuple(backend) if backend else CPU_BACKENDS
    modes = ("fwd", "fwd_bwd")
    n_cases = len(ns) * len(modes) * 2 * len(backends)
    console = Console()
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("attention on the CPU", total=n_cases)
        rows = cpu.sweep(ns=ns, modes=modes, reps=reps or CPU_REPS, backends=backends,
                         memory=memory, progress=lambda case: progress.advance(task))
    table = cpu.markdown_table(rows)
    typer.echo(f"machine: {cpu.machine_description()}")
    typer.echo(table)
    if out is not None:
        atomic_write_text(out / "results.json", json.dumps(rows, indent=2))
        atomic_write_text(out / "results.md", table + "\n")
        typer.echo(f"wrote {out / 'results.json'} and {out / 'results.md'}")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
