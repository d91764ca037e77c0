"""`qkv compare`: attention against an LSTM and a causal CNN, and three beliefs about attention
put to the test, in one reproducible report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

_OPTIONS = {"seed": "--seed", "max_len": "--max-len", "memory_budget": "--memory"}


def compare(
    quick: Annotated[bool, typer.Option(
        help="every row on tiny settings (under a minute on a quiet core)")] = False,
    only: Annotated[list[str] | None, typer.Option(
        "--only", metavar="ROW", show_default="all rows",
        help="run only this row (repeatable, or comma-separated): cost, path, recall, code, "
             "position, explain, scale")] = None,
    out: Annotated[Path, typer.Option(
        help="folder for report.md, results.json and the plots; a folder holding a finished "
             "row resumes it", show_default="compare, in the current folder")]
        = Path("compare"),
    seed: Annotated[int, typer.Option(
        help="seed of the rows that train models (path, recall, code, position, explain); the "
             "cost and scale rows always use seed 0, so it does not change them")] = 0,
    max_len: Annotated[int | None, typer.Option(
        "--max-len", show_default="16384; 1024 with --quick",
        help="longest sequence of the cost and scale rows (at least 256)")] = None,
    memory: Annotated[str | None, typer.Option(
        help="memory budget of the scale row and cap of the cost row, e.g. 8GiB, 512MiB, 2GB; "
             "at most what the machine has available",
        show_default="8GiB, or the whole GiB the machine has available if less")] = None,
    overwrite: Annotated[bool, typer.Option(
        help="rerun the rows asked for, even where --out holds them run under other "
             "settings; rows not asked for are kept (the report marks those run under other "
             "settings)")]
        = False,
) -> None:
    """Measure attention against an LSTM and a TCN, test three beliefs about attention, and
    write report.md (rerun the same command to resume an interrupted run)."""
    from qkv.cli._errors import user_errors

    with user_errors():
        from qkv.compare import Settings, runner
        from qkv.units import parse_bytes

        rows = None if only is None else [name.strip() for value in only
                                          for name in value.split(",") if name.strip()]
        try:
            names = runner.check_rows(rows)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--only") from None
        try:
            budget = _default_budget(names) if memory is None else parse_bytes(memory, "it")
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--memory") from None
        settings = Settings(quick=quick, seed=seed, max_len=max_len, memory_budget=budget)
        try:
            runner.check_settings(settings, names)
        except runner.SettingError as e:
            raise typer.BadParameter(str(e), param_hint=_OPTIONS[e.setting]) from None
        _check_out(out, settings, overwrite)
        _run(settings, names, out, overwrite)


def _default_budget(names: list[str]) -> int:
    """8GiB, or the whole GiB (else MiB) this machine has available if that is less and a row
    asked for uses the budget (saying so on stderr)."""
    from qkv.bench import cpu
    from qkv.cli._errors import warn
    from qkv.compare import Settings, runner
    from qkv.units import format_bytes, readable_size

    budget = Settings().memory_budget
    if not any("memory_budget" in runner.depends_on(name) for name in names):
        return budget
    available = cpu.machine_memory_bytes()
    if budget <= available:
        return budget
    fits = (available >> 30 << 30) or (available >> 20 << 20) or 1
    warn(f"this machine has {format_bytes(available)} of memory available, less than the "
         f"default budget {readable_size(budget)}: using --memory {readable_size(fits)}")
    return fits


def _check_out(out: Path, settings, overwrite: bool) -> None:
    """Refuse (exit 2, nothing written) an --out that is not a writable folder or that holds
    rows run under other settings."""
    from qkv.cli._files import check_writable_folder
    from qkv.compare import runner

    try:
        if out.is_dir():
            runner.check_folder(out, settings, overwrite)
        check_writable_folder(out)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--out") from None


def _run(settings, names: list[str], out: Path, overwrite: bool) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from qkv.compare import runner

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True,
                  disable=not console.is_terminal) as bars:
        overall = bars.add_task("rows", total=len(names))
        current = bars.add_task("", total=None, visible=False)

        shown = {"row": None}

        def progress(done, total, name, description, completed, row_total):
            bars.update(overall, completed=done, description=f"rows ({name})")
            if shown["row"] != name:  # a new row: its own bar starts empty, without a total
                shown["row"] = name
                bars.reset(current, total=None, visible=True)
            step = {} if completed is None else {"completed": completed, "total": row_total}
            bars.update(current, description=f"  {name}: {description}", **step)

        try:
            document = runner.run_compare(settings, names, out, overwrite=overwrite,
                                          progress=progress)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"interrupted; the finished rows are saved in {out}: run "
                                    "the same command again to resume") from None
    typer.echo(f"report: {out / runner.REPORT_FILE}")
    for name in names:
        result = document["rows"][name]["result"]
        typer.echo(f"  {name}: {result['headline'] if result else 'not run'}")


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)
