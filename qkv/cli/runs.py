"""`qkv runs`: the checkpoints of a run folder with their step, metrics, and which one is used."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def runs_command(
    run_dir: Annotated[Path, typer.Argument(help="a run folder (the --out-dir of qkv train)",
                                            metavar="RUN_DIR")],
    json_out: Annotated[bool, typer.Option("--json", help="print the rows as JSON")] = False,
) -> None:
    """List a run's checkpoints: step, path, validation metrics, and the one that --resume
    and `qkv eval --checkpoint RUN_DIR` use."""
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
    cells = []
    for row in rows:
        metrics = row["eval"] or {}
        status = ("used by --resume and eval" if row["latest"] else
                  "usable" if row["usable"] else f"unusable: {row['problem']}")
        cells.append([str(row["step"]), row["path"], _number(metrics.get("loss"), ".4f"),
                      _number(metrics.get("ppl"), ".2f"), _number(metrics.get("bpb"), ".3f"),
                      _number(row["tokens_seen"], ",d"), status])
    headers = ["step", "path", "loss", "ppl", "bpb", "tokens", "status"]
    console = Console()
    table = Table(title=f"checkpoints of {run_dir} (validation loss, ppl, bits per byte)")
    widths = [max(len(h), *(len(line[i]) for line in cells)) for i, h in enumerate(headers)]
    # the path is served first: as wide as it needs, up to what the other columns leave with
    # the status folded to its longest word; the status gets the rest
    room = console.width - (sum(widths) - widths[1] - widths[-1]) - 3 * len(headers) - 1
    path_width = min(widths[1], max(12, room - _STATUS_WIDTH))
    status_width = max(_STATUS_WIDTH, min(widths[-1], room - path_width))
    for header in headers:
        if header == "path":
            table.add_column(header, overflow="fold", width=path_width)
        elif header == "status":
            table.add_column(header, overflow="fold", width=status_width)
        else:
            table.add_column(header, justify="right", no_wrap=True)
    for line in cells:
        table.add_row(*line)
    console.print(table)


_STATUS_WIDTH = 8  # "--resume", the longest word of a status


def _number(value, spec: str) -> str:
    """`value` formatted, or "-" when it is missing or not a number (a corrupt record)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    if spec.endswith("d") and not isinstance(value, int):
        return "-"
    return format(value, spec)


def register(app: typer.Typer) -> None:
    app.command("runs")(runs_command)
