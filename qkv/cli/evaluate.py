"""`qkv eval`: a checkpoint's loss, perplexity and bits per byte on a corpus split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def eval_command(
    checkpoint: Annotated[Path, typer.Option(
        help="a checkpoint folder, or a run folder (its newest usable checkpoint)")],
    split: Annotated[str, typer.Option(help="train, validation or test")] = "test",
    corpus: Annotated[str | None, typer.Option(
        help="corpus to evaluate on", show_default="the one the checkpoint was trained on")]
        = None,
    max_bytes: Annotated[int | None, typer.Option(
        help="corpus size cap", show_default="as trained")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="windows per batch")] = 16,
    max_batches: Annotated[int | None, typer.Option(
        min=1, help="evaluate only this many batches", show_default="all")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")] = "cpu",
    json_out: Annotated[bool, typer.Option("--json", help="print the numbers as JSON")] = False,
) -> None:
    """Evaluate a trained model on a split and compare it with a byte bigram baseline."""
    import json

    from rich.console import Console
    from rich.table import Table

    from qkv.cli._errors import user_errors, warn

    with user_errors():
        from qkv.device import resolve_device
        from qkv.train.evaluate import evaluate_checkpoint

        m = evaluate_checkpoint(checkpoint, split=split, corpus=corpus, max_bytes=max_bytes,
                                batch_size=batch_size, max_batches=max_batches,
                                device=resolve_device(device), warn=warn)
    if json_out:
        typer.echo(json.dumps(m, indent=1))
        return
    table = Table(title=f"{m['split']} split of {m['corpus']} ({m['tokens']:,} tokens, "
                        f"{m['bytes']:,} bytes)")
    table.add_column("model", overflow="fold")  # a checkpoint's path is never cut short
    for column in ("loss (nats/token)", "perplexity", "bits per byte"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_row("byte bigram (Kneser-Ney)", "", "", f"{m['bigram_bpb']:.3f}")
    table.add_row(m["checkpoint"], f"{m['loss']:.4f}", f"{m['ppl']:.2f}", f"{m['bpb']:.3f}")
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
