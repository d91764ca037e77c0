"""`qkv runs`: the checkpoints of a run folder with their step, metrics, and which one is used."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def runs_command(
    run_dir: Annotated[Path, typer.Argument(help="a run folder (the --out-dir of qkv train)")],
    json_out: Annotated[bool, typer.Option("--json", help="print the rows as JSON")] = False,
) -> None:
    """List a run's checkpoints: step, path, validation metrics, and the one that --resume
    and `qkv eval RUN_DIR` use."""
    import json

    from rich.console import Console
    from rich.table import Table

    from qkv.cli._errors import user_errors

    with user_errors():
        from qkv.train.checkpoint import describe_checkpoints

        if run_dir.exists() and not run_dir.is_dir():
            raise NotADirectoryError(f"{run_dir} is a file, not a run folder")
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run folder {run_dir} does not exist")
        rows = describe_checkpoints(run_dir)
    if json_out:
        typer.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        typer.echo(f"{run_dir} holds no checkpoint")
        return
    table = Table(title=f"checkpoints of {run_dir}")
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("path", overflow="fold")  # a path is never cut short
    for column in ("val loss", "val ppl", "val bits/byte", "tokens"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("status", overflow="fold")
    for row in rows:
        metrics = row["eval"] or {}
        status = ("used by --resume and eval" if row["latest"] else
                  "usable" if row["usable"] else f"unusable: {row['problem']}")
        table.add_row(str(row["step"]), row["path"], _number(metrics.get("loss"), ".4f"),
                      _number(metrics.get("ppl"), ".2f"), _number(metrics.get("bpb"), ".3f"),
                      _number(row["tokens_seen"], ",d"), status)
    Console().print(table)


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def register(app: typer.Typer) -> None:
    app.command("runs")(runs_command)
