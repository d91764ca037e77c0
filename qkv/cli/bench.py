"""`qkv bench`: attention speed and memory beside torch, on the CPU or a CUDA GPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from qkv.io import atomic_write_text


def bench(
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    quick: Annotated[bool, typer.Option(help="small sizes only (about a minute on a CPU)")] = False,
    out: Annotated[Path | None, typer.Option(help="folder for results.json and results.md")] = None,
    reps: Annotated[int, typer.Option(min=1, help="timed repetitions per case (median)")] = 3,
    n: Annotated[list[int] | None, typer.Option(
        "--n", min=1, help="CPU: sequence lengths (repeatable); default 1k..16k")] = None,
    backend: Annotated[list[str] | None, typer.Option(
        "--backend", help="CPU: torch, chunked, reference (repeatable); default all")] = None,
) -> None:
    """Time qkv's attention backends beside torch SDPA, in the same process, and print a table."""
    import torch
    from rich.progress import Progress

    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"must be auto, cpu or cuda, got {device!r}",
                                 param_hint="--device")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise typer.BadParameter("CUDA is not available on this machine", param_hint="--device")
        from qkv.bench import gpu  # needs triton and a GPU

        typer.echo(gpu.markdown_table(gpu.run_gpu_sweep(out, quick=quick)))
        if out is not None:
            typer.echo(f"wrote attention_gpu.json, .md and .png under {out}")
        return
    from qkv.bench import cpu

    ns = tuple(n) if n else (512, 1024) if quick else (1024, 2048, 4096, 8192, 16384)
    backends = tuple(backend) if backend else cpu.BACKENDS
    unknown = sorted(set(backends) - set(cpu.BACKENDS))
    if unknown:
        raise typer.BadParameter(f"unknown {unknown}; choose from {list(cpu.BACKENDS)}",
                                 param_hint="--backend")
    modes = ("fwd", "fwd_bwd")
    n_cases = len(ns) * len(modes) * 2 * len(backends)
    with Progress(transient=True) as progress:
        task = progress.add_task("attention on the CPU", total=n_cases)
        rows = cpu.sweep(ns=ns, modes=modes, reps=reps, backends=backends,
                         progress=lambda case: progress.advance(task))
    table = cpu.markdown_table(rows)
    typer.echo(f"machine: {cpu.machine_description()}")
    typer.echo(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "results.json", json.dumps(rows, indent=2))
        atomic_write_text(out / "results.md", table + "\n")
        typer.echo(f"wrote {out / 'results.json'} and {out / 'results.md'}")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
