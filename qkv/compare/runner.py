"""Run the rows of `qkv compare` into a folder, resumably.

The folder holds one file per finished row (`rows/<name>.json`: its result, the settings it ran
under, its start date and seconds), the figures the rows drew, and `results.json` and
`report.md`, which are rewritten (atomically) after every row: a crash or Ctrl-C leaves a
consistent report of what finished, and running the same command again resumes: a row saved
under equal settings is not run again. A folder holding rows run under other settings is
refused, unless `overwrite` asks to replace them. A lock on the folder keeps a second run out.

A row draws its figures into `.pending/<name>/`. When it ends, its record is saved pointing at
them there (the switch from the old row to the new one, old figures untouched) and the outputs
are rewritten; then the figures are copied to their own names in the folder, the record is
saved again pointing at those, the outputs are rewritten, and the pending folder and the old
figures the new row does not draw are removed. A crash at any step leaves the old row with its
old figures or the new row with its new ones (and a report of one of them); the next run
finishes a switch left half done.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from qkv.compare import ROW_NAMES, Context, RowResult, Settings, load_row
from qkv.compare.core import setting_text
from qkv.compare.measure import SMALLEST_N
from qkv.io import atomic_path, atomic_write_text
from qkv.train.config import MAX_SEED
from qkv.units import exact_size, format_bytes, readable_size

ROWS_DIR = "rows"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
PENDING_DIR = ".pending"  # rows draw their figures in PENDING_DIR/<row>/ (see above)
# Rows seed their generators with the seed plus offsets (up to a few million, plus step
# numbers); the largest seed leaves that much room below what a torch generator takes.
SEED_ROOM = 10**7
LARGEST_SEED = MAX_SEED - SEED_ROOM

# progress(rows_done, rows_total, row_name, description, completed, total)
ProgressFn = Callable[[int, int, str, str, "float | None", "float | None"], None]

class SettingError(ValueError):
    """A setting that no run can use; `setting` names it (a field of Settings)."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting


def check_rows(rows: Sequence[str] | None) -> list[str]:
    """The rows asked for, in report order, each once (all rows for None); ValueError naming
    the known rows for an unknown name, or for an empty list (it asks for no row)."""
    if rows is not None and not list(rows):
        raise ValueError(f"no row named; choose from {list(ROW_NAMES)}")
    unknown = [name for name in rows or () if name not in ROW_NAMES]
    if unknown:
        raise ValueError(f"unknown row {unknown[0]!r}; choose from {list(ROW_NAMES)}")
    return [name for name in ROW_NAMES if rows is None or name in rows]


def check_settings(settings: Settings, rows: Sequence[str]) -> None:
    """SettingError for settings no run can use: a seed below 0 or above LARGEST_SEED, a
    longest n below the cost and scale rows' smallest, or a memory budget too small for any
    case of a row asked for (a row module may define `min_memory(settings) -> bytes`)."""
    if not isinstance(settings.seed, int) or not 0 <= settings.seed <= LARGEST_SEED:
        raise SettingError("seed", f"seed must be an integer >= 0 and at most {LARGEST_SEED} "
                           f"(2**63 - 1 - 10**7: the rows add offsets to it), got "
                           f"{settings.seed!r}")
    if settings.max_len is not None and settings.max_len < SMALLEST_N:
        raise SettingError("max_len", f"max_len must be at least {SMALLEST_N} (the shortest "
                           f"sequence of the cost and scale rows), got {settings.max_len}")
    if settings.memory_budget < 1:
        raise SettingError("memory_budget", "memory budget must be at least one byte, got "
                           f"{settings.memory_budget}")
    _check_budget_fits(settings, rows)
    for name in rows:
        need = getattr(sys.modules.get(load_row(name).run.__module__), "min_memory", None)
        if need is not None and settings.memory_budget < (least := need(settings)):
            budget = readable_size(settings.memory_budget)
            raise SettingError("memory_budget", f"memory budget {budget} is too small for even "
                               f"the smallest case of row {name!r}, "
                               f"which needs about {least / 2**20:.0f} MiB")


def _check_budget_fits(settings: Settings, rows: Sequence[str]) -> None:
    """SettingError if a row asked for depends on the memory budget and it is more than this
    machine has available now (a case measured past that would be killed by the system)."""
    from qkv.bench import cpu

    if not any("memory_budget" in depends_on(name) for name in rows):
        return
    available = cpu.machine_memory_bytes()
    if settings.memory_budget > available:
        raise SettingError("memory_budget", f"memory budget {readable_size(settings.memory_budget)}"
                           f" is more than the {format_bytes(available)} this machine has "
                           f"available; pick at most {available >> 20}MiB")


def row_file(out: Path, name: str) -> Path:
    return Path(out) / ROWS_DIR / f"{name}.json"


def saved_rows(out: Path) -> dict[str, dict]:
    """The rows saved in `out` (name -> what run_compare saved), unreadable files left out."""
    saved = {}
    for name in ROW_NAMES:
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(row_file(out, name).read_text(encoding="utf-8"))
            if isinstance(record, dict) and {"settings", "result"} <= record.keys():
                saved[name] = record
    return saved


def depends_on(name: str) -> tuple[str, ...]:
    """The settings row `name` depends on (every setting if its module cannot be imported)."""
    try:
        return tuple(load_row(name).depends_on)
    except ImportError:
        return tuple(Settings().as_dict())


def stale_rows(out: Path, settings: Settings) -> dict[str, list[str]]:
    """For each row saved in `out` under settings that differ in one it depends on, those
    settings; a row saved under settings that differ only in others is reused as it is."""
    wanted = settings.as_dict()
    stale = {}
    for name, record in saved_rows(out).items():
        differ = [k for k in depends_on(name) if record["settings"].get(k) != wanted.get(k)]
        if differ:
            stale[name] = differ
    return stale


def _ours(out: Path) -> bool:
    """Whether results.json in `out` is absent or one that run_compare wrote."""
    try:
        document = json.loads((Path(out) / RESULTS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return not (Path(out) / REPORT_FILE).exists()
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and {"settings", "rows", "command"} <= document.keys()


def check_folder(out: Path, settings: Settings, overwrite: bool = False) -> None:
    """ValueError if `out` holds a results.json or report.md that qkv compare did not write,
    or rows that are stale under these settings (see stale_rows) and `overwrite` is not set."""
    if not _ours(out):
        raise ValueError(f"{out} holds a {RESULTS_FILE} or {REPORT_FILE} that qkv compare did "
                         "not write; pick another --out")
    stale = stale_rows(out, settings)
    if stale and not overwrite:
        saved, wanted = saved_rows(out), settings.as_dict()

        def differ(name: str, keys: list[str]) -> str:
            there = saved[name]["settings"]
            return ", ".join(f"{k} {setting_text(k, there.get(k))} there, "
                             f"{setting_text(k, wanted[k])} now" for k in keys)

        rows = "; ".join(f"{name} ({differ(name, keys)})" for name, keys in stale.items())
        raise ValueError(f"{out} holds rows run under other settings: {rows}; pass --overwrite "
                         "to rerun the rows asked for (the others are kept, marked in the "
                         "report as run under other settings), or pick another --out")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def command_line(out: Path, settings: Settings, rows: Sequence[str]) -> str:
    """The `qkv compare` command that reproduces these settings and rows into `out`."""
    parts = ["qkv", "compare"]
    if settings.quick:
        parts.append("--quick")
    if list(rows) != list(ROW_NAMES):
        parts += [f"--only {name}" for name in rows]
    parts += ["--seed", str(settings.seed)]
    if settings.max_len is not None:
        parts += ["--max-len", str(settings.max_len)]
    if settings.memory_budget != Settings().memory_budget:
        parts += ["--memory", exact_size(settings.memory_budget)]
    parts += ["--out", str(out)]
    return " ".join(parts)


def _title(name: str) -> str:
    try:
        return load_row(name).title
    except ImportError:
        return name


def results_document(out: Path, settings: Settings) -> dict:
    """What results.json holds: the run's settings, machine and versions, and every row saved
    in `out`; a row saved under other settings it depends on carries `stale`, the names of
    those settings (rows not run are listed with their titles only)."""
    import torch

    import qkv
    from qkv.bench.cpu import machine_description

    wanted = settings.as_dict()
    stale = stale_rows(out, settings)
    saved = {name: {**record, "stale": stale[name]} if name in stale else record
             for name, record in saved_rows(out).items()}
    return {
        "command": command_line(out, settings, [n for n in ROW_NAMES
                                                if n in saved and n not in stale] or ROW_NAMES),
        "settings": wanted,
        "seed": settings.seed,
        "machine": machine_description(),
        "versions": {"qkv": qkv.__version__, "torch": torch.__version__,
                     "python": sys.version.split()[0]},
        "threads": torch.get_num_threads(),
        "date": _now(),
        "seconds": {name: record["seconds"] for name, record in saved.items()},
        "rows": {name: saved.get(name, {"title": _title(name), "result": None})
                 for name in ROW_NAMES},
    }


def write_outputs(out: Path, settings: Settings) -> dict:
    """Rewrite results.json and then report.md (each atomically) from the saved rows."""
    from qkv.compare.report import render

    document = results_document(out, settings)
    atomic_write_text(Path(out) / RESULTS_FILE, json.dumps(document, indent=2) + "\n")
    atomic_write_text(Path(out) / REPORT_FILE, render(document))
    return document


def _copy_figure(source: Path, target: Path) -> None:
    """Copy a figure onto `target` atomically."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def _remove(path: Path) -> None:
    """Remove a file, or a folder and everything in it."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _save_row(out: Path, record: dict) -> None:
    atomic_write_text(row_file(out, record["name"]), json.dumps(record, indent=2) + "\n")


def _figures_in(record: dict) -> list[str]:
    return list(record["result"].get("figures") or [])


def _own_figures(out: Path, name: str, record: dict) -> None:
    """Finish switching to a saved row whose figures are still in its pending folder: copy
    them to their own names, then save the record pointing at those."""
    prefix = f"{PENDING_DIR}/{name}/"
    figures = _figures_in(record)
    own = [figure.removeprefix(prefix) for figure in figures]
    if own != figures:
        for figure, target in zip(figures, own, strict=True):
            if figure != target:
                _copy_figure(out / figure, out / target)
        _save_row(out, {**record, "result": {**record["result"], "figures": own}})


def _tidy(out: Path, drop: Sequence[str] = ()) -> None:
    """Remove the figures in `drop` that no saved row draws, and the pending folders (none is
    a saved row's once _own_figures has run and the outputs have been rewritten)."""
    drawn = {figure for record in saved_rows(out).values() for figure in _figures_in(record)}
    for figure in drop:
        if figure not in drawn and (out / figure).exists():
            _remove(out / figure)
    if (out / PENDING_DIR).exists():
        _remove(out / PENDING_DIR)


def _settle(out: Path, settings: Settings) -> None:
    """Finish every switch a crash left half done (rewriting the outputs), and remove pending
    figures no saved row owns."""
    if not (out / PENDING_DIR).exists():
        return
    for name, record in saved_rows(out).items():
        if any(f.startswith(f"{PENDING_DIR}/{name}/") for f in _figures_in(record)):
            _own_figures(out, name, record)
            write_outputs(out, settings)
    _tidy(out)


def _replace_row(out: Path, record: dict, settings: Settings) -> dict:
    """Save a finished row whose figures are in its pending folder in place of the saved one
    (see the module's docstring), rewriting the outputs; return results.json's content."""
    name = record["name"]
    old = saved_rows(out).get(name)
    figures = _figures_in(record)
    staged = {**record, "result": {**record["result"],
                                   "figures": [f"{PENDING_DIR}/{name}/{f}" for f in figures]}}
    _save_row(out, staged)  # the switch: the new row, its figures still pending
    if figures:
        write_outputs(out, settings)  # a report of the new row, while the old figures change
    _own_figures(out, name, staged)
    document = write_outputs(out, settings)
    _tidy(out, [f for f in _figures_in(old) if f not in figures] if old else [])
    return document


def run_compare(settings: Settings, rows: Sequence[str] | None, out: Path, *,
                overwrite: bool = False, progress: ProgressFn | None = None) -> dict:
    """Run `rows` (all for None) into the folder `out`; return results.json's content.

    A row saved in `out` under the settings it depends on (Row.depends_on) is reused, not run
    (unless `overwrite`). Rows saved under others (stale_rows) make this a ValueError naming
    the rows and settings; with `overwrite` the rows asked for run again, each replacing its
    saved row only once it has finished, and stale rows not asked for are kept (the report
    marks them as run under other settings). After every row, its record
    goes to rows/<name>.json and results.json and report.md are rewritten, so a row that raises
    (or Ctrl-C) leaves the finished rows and a report of them, and the error propagates.
    `progress(rows_done, rows_total, row, description, completed, total)` hears of each step.
    """
    from qkv.compare.measure import threads
    from qkv.train.runfolder import RunLock

    names = check_rows(rows)
    check_settings(settings, names)
    out = Path(out)
    check_folder(out, settings, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)
    lock.acquire()
    try:
        with threads():  # every row on one thread (qkv.compare.measure.THREADS says why)
            return _run_locked(settings, names, out, overwrite, progress)
    finally:
        lock.release()


def _run_locked(settings, names, out, overwrite, progress) -> dict:
    report = progress or (lambda *args: None)
    wanted = settings.as_dict()
    check_folder(out, settings, overwrite)  # again, now that no other run can write here
    _settle(out, settings)
    saved, stale = saved_rows(out), stale_rows(out, settings)
    document = None
    for index, name in enumerate(names):
        if name in saved and name not in stale and not overwrite:
            report(index + 1, len(names), name, "already done", None, None)
            continue
        row = load_row(name)
        report(index, len(names), name, row.title, None, None)
        pending = out / PENDING_DIR / name
        ctx = Context(settings, pending, lambda text, done=None, total=None, i=index, n=name:
                      report(i, len(names), n, text, done, total))
        started, start = _now(), time.perf_counter()
        try:
            result: RowResult = row.run(ctx)
        except BaseException:
            with contextlib.suppress(Exception):  # the row's own error is the one to see
                write_outputs(out, settings)
                _tidy(out)  # its half-drawn figures go
            raise
        record = {"name": name, "title": row.title, "settings": wanted, "started": started,
                  "seconds": time.perf_counter() - start, "result": result.as_dict()}
        document = _replace_row(out, record, settings)
        report(index + 1, len(names), name, "done", None, None)
    return document if document is not None else write_outputs(out, settings)
