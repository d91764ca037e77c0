import contextlib
import json
import re

import pytest

import qkv.compare.runner as runner
from qkv.compare import ROW_NAMES, Row, RowResult, Settings
from qkv.compare.report import render
from qkv.compare.runner import run_compare
from qkv.io import atomic_path

QUICK = Settings(quick=True)


class FakeRows:
    """Rows `cost` and `path` that count their runs; `path` raises if told to."""

    def __init__(self):
        self.runs = {"cost": 0, "path": 0}
        self.fail = False

    def load(self, name):
        if name not in self.runs:
            raise ImportError(name)

        def run(ctx):
            self.runs[name] += 1
            ctx.progress("measuring", 1, 2)
            ctx.out.mkdir(parents=True, exist_ok=True)
            (ctx.out / f"{name}_plot.png").write_text(f"{name} {self.runs[name]}")
            if name == "path" and self.fail:
                raise RuntimeError("the row broke")
            return RowResult(claim=f"{name} claim", anchor="a paper, Table 1",
                             findings="the numbers agree", agrees=name == "cost",
                             headline=f"{name} headline {self.runs[name]}",
                             tables=["| a |\n|---|\n| 1 |"], figures=[f"{name}_plot.png"],
                             data={"x": [1, 2]})

        depends = {"depends_on": ("quick", "max_len", "memory_budget")} if name == "cost" else {}
        return Row(name=name, title=f"{name.title()} row", run=run, minutes=0.1, **depends)


@pytest.fixture
def fake(monkeypatch):
    from qkv.bench import cpu

    rows = FakeRows()
    monkeypatch.setattr(runner, "load_row", rows.load)
    monkeypatch.setattr(cpu, "machine_memory_bytes", lambda: 1 << 40)  # any budget fits
    return rows


def test_a_finished_row_is_saved_and_reused(tmp_path, fake):
    events = []
    doc = run_compare(QUICK, ["cost"], tmp_path, progress=lambda *a: events.append(a))
    assert fake.runs == {"cost": 1, "path": 0}
    assert doc["rows"]["cost"]["result"]["data"] == {"x": [1, 2]}
    assert doc["rows"]["path"]["result"] is None
    saved = json.loads((tmp_path / "rows" / "cost.json").read_text())
    assert saved["settings"] == QUICK.as_dict() and saved["seconds"] >= 0
    assert (0, 1, "cost", "measuring", 1, 2) in events
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["seed"] == 0 and "torch" in results["versions"]
    assert set(results["rows"]) == set(ROW_NAMES)
    doc = run_compare(QUICK, ["cost", "path"], tmp_path)
    assert fake.runs == {"cost": 1, "path": 1}
    assert "cost headline 1" in (tmp_path / "report.md").read_text()


def test_other_settings_are_refused_naming_them_and_overwrite_reruns(tmp_path, fake):
    run_compare(QUICK, ["path"], tmp_path)
    before = (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match=r"path \(seed 0 there, 3 now\).*--overwrite.*--out"):
        run_compare(Settings(quick=True, seed=3), ["path"], tmp_path)
    assert (tmp_path / "report.md").read_text() == before and fake.runs["path"] == 1
    run_compare(QUICK, ["path"], tmp_path, overwrite=True)
    assert fake.runs["path"] == 2
    doc = run_compare(Settings(quick=True, seed=3), ["path"], tmp_path, overwrite=True)
    assert fake.runs["path"] == 3 and "stale" not in doc["rows"]["path"]
    assert json.loads((tmp_path / "rows" / "path.json").read_text())["settings"]["seed"] == 3


def test_a_setting_a_row_does_not_depend_on_leaves_it_current(tmp_path, fake):
    run_compare(QUICK, ["cost"], tmp_path)
    doc = run_compare(Settings(quick=True, seed=8), ["cost"], tmp_path)  # cost ignores seeds
    assert fake.runs == {"cost": 1, "path": 0} and "stale" not in doc["rows"]["cost"]
    assert doc["rows"]["cost"]["result"]["headline"] == "cost headline 1"
    with pytest.raises(ValueError, match=r"holds rows run under other settings: cost "
                                         r"\(memory_budget 8GiB there, 1GiB now\)"):
        run_compare(Settings(quick=True, memory_budget=1 << 30), ["path"], tmp_path)


def test_overwrite_keeps_stale_rows_not_asked_for_and_marks_them(tmp_path, fake):
    run_compare(QUICK, ["cost", "path"], tmp_path)
    small = Settings(quick=True, memory_budget=1 << 30)
    doc = run_compare(small, ["cost"], tmp_path, overwrite=True)
    assert fake.runs == {"cost": 2, "path": 1}
    assert "stale" not in doc["rows"]["cost"] and doc["rows"]["path"].get("stale") is None
    doc = run_compare(Settings(quick=True, seed=4, memory_budget=1 << 30), ["cost"], tmp_path,
                      overwrite=True)
    assert fake.runs == {"cost": 3, "path": 1}  # the seed-0 path row is kept, not deleted
    assert doc["rows"]["path"]["stale"] == ["seed"]
    assert doc["rows"]["path"]["result"]["headline"] == "path headline 1"
    assert (tmp_path / "rows" / "path.json").exists()
    report = (tmp_path / "report.md").read_text()
    assert "disagrees (run under other settings)" in report
    assert "**Run under other settings:** seed=0 (this report: seed=4)" in report
    assert "--only cost" in doc["command"] and "--only path" not in doc["command"]


def test_a_row_that_raises_leaves_the_finished_rows_and_a_report(tmp_path, fake):
    fake.fail = True
    with pytest.raises(RuntimeError, match="the row broke"):
        run_compare(QUICK, ["cost", "path"], tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "cost headline 1" in report and "not run" in report
    assert json.loads((tmp_path / "results.json").read_text())["rows"]["path"]["result"] is None
    fake.fail = False
    run_compare(QUICK, ["cost", "path"], tmp_path)  # resumes: only path runs again
    assert fake.runs == {"cost": 1, "path": 2}


def test_unknown_row_is_refused_before_the_disk_is_touched(tmp_path, fake):
    with pytest.raises(ValueError, match=r"unknown row 'nope'.*'cost'"):
        run_compare(QUICK, ["cost", "nope"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_empty_row_list_is_refused_not_taken_for_all_rows(tmp_path, fake):
    with pytest.raises(ValueError, match="no row named"):
        run_compare(QUICK, [], tmp_path / "out")
    assert not (tmp_path / "out").exists() and fake.runs == {"cost": 0, "path": 0}


@pytest.mark.parametrize("seed", [-1, 2**63 - 1, 2**63 - 10**6, 99999999999999999999])
def test_a_seed_out_of_range_is_refused_before_any_row(seed, tmp_path, fake):
    with pytest.raises(runner.SettingError, match=r"seed must be .* at most") as error:
        run_compare(Settings(quick=True, seed=seed), ["cost"], tmp_path / "out")
    assert error.value.setting == "seed" and fake.runs["cost"] == 0
    assert not (tmp_path / "out").exists()


def test_the_largest_seed_leaves_room_for_every_offset():
    import torch

    torch.Generator().manual_seed(runner.LARGEST_SEED + runner.SEED_ROOM)
    runner.check_settings(Settings(quick=True, seed=runner.LARGEST_SEED), ["cost"])


def test_a_failed_write_keeps_the_previous_report(tmp_path, fake, monkeypatch):
    run_compare(QUICK, ["cost"], tmp_path)
    good = {f: (tmp_path / f).read_text() for f in ("results.json", "report.md")}
    real = runner.atomic_write_text

    def failing(path, text):
        if path.name in ("report.md", "results.json"):
            with atomic_path(path) as tmp:
                tmp.write_text(text[:10])
                raise OSError(28, "No space left on device", str(path))
        real(path, text)

    monkeypatch.setattr(runner, "atomic_write_text", failing)
    with pytest.raises(OSError):
        run_compare(QUICK, ["path"], tmp_path)
    assert {f: (tmp_path / f).read_text() for f in good} == good
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_the_report_lists_rows_not_run():
    doc = {"command": "qkv compare --quick --seed 0 --out x", "settings": QUICK.as_dict(),
           "seed": 0, "machine": "a machine", "versions": {"torch": "2"}, "threads": 1,
           "date": "today", "seconds": {},
           "rows": {"cost": {"title": "Cost and parallelism", "seconds": 1.0,
                             "result": RowResult("c", "LRA, Table 2", "f", False, "h | 1",
                                                 figures=["cost_time.png"]).as_dict()},
                    "scale": {"title": "Not free to scale", "result": None}}}
    text = render(doc)
    assert "| [Cost and parallelism](#row-cost) (`cost`) | h \\| 1 | disagrees |" in text
    assert "| Not free to scale (`scale`) | not run | — |" in text
    assert "![Cost and parallelism: cost time](cost_time.png)" in text
    assert "**Anchor.** LRA, Table 2" in text and "rows finished: 1 of 2" in text




def test_a_folder_with_someone_elses_report_is_refused(tmp_path, fake):
    (tmp_path / "report.md").write_text("my own notes\n")
    with pytest.raises(ValueError, match="did not write; pick another --out"):
        run_compare(QUICK, ["cost"], tmp_path)
    assert (tmp_path / "report.md").read_text() == "my own notes\n"
    assert fake.runs["cost"] == 0


def test_overwrite_keeps_the_old_row_until_its_rerun_ends(tmp_path, fake):
    run_compare(QUICK, ["path"], tmp_path)
    fake.fail = True
    with pytest.raises(RuntimeError):
        run_compare(QUICK, ["path"], tmp_path, overwrite=True)
    saved = json.loads((tmp_path / "rows" / "path.json").read_text())
    assert saved["result"]["headline"] == "path headline 1"
    assert "path headline 1" in (tmp_path / "report.md").read_text()


def _assert_whole(out, name="path") -> int:
    """The saved row's figures exist and are the ones its run drew; the report's too. Returns
    the number of the run the saved row is."""
    record = json.loads((out / "rows" / f"{name}.json").read_text())
    run = int(record["result"]["headline"].split()[-1])
    for figure in record["result"]["figures"]:
        assert (out / figure).read_text() == f"{name} {run}", figure
    report = (out / "report.md").read_text()  # rewritten after the row: of it or the old one
    shown = int(re.search(rf"{name} headline (\d+)", report).group(1))
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert figures and all((out / f).read_text() == f"{name} {shown}" for f in figures)
    return run


@pytest.mark.parametrize("step", range(12))
def test_a_crash_at_any_step_of_replacing_a_row_leaves_old_or_new_whole(step, tmp_path, fake,
                                                                        monkeypatch,
                                                                        crash_at_call):
    run_compare(QUICK, ["path"], tmp_path)
    assert _assert_whole(tmp_path) == 1
    calls = crash_at_call(runner, ("atomic_write_text", "_copy_figure", "_remove"), step)
    with contextlib.suppress(OSError):
        run_compare(QUICK, ["path"], tmp_path, overwrite=True)
    assert _assert_whole(tmp_path) in (1, 2), calls
    monkeypatch.undo()
    monkeypatch.setattr(runner, "load_row", fake.load)
    run_compare(QUICK, ["path"], tmp_path)  # resumes: finishes a switch left half done
    assert _assert_whole(tmp_path) in (1, 2)
    assert (tmp_path / "path_plot.png").exists() and not (tmp_path / ".pending").exists()
    assert json.loads((tmp_path / "rows" / "path.json").read_text())["result"]["figures"] == [
        "path_plot.png"]


def test_figures_are_drawn_aside_until_the_row_is_saved(tmp_path, fake):
    run_compare(QUICK, ["path"], tmp_path)
    fake.fail = True  # the rerun draws its figure and then raises
    with pytest.raises(RuntimeError):
        run_compare(QUICK, ["path"], tmp_path, overwrite=True)
    assert (tmp_path / "path_plot.png").read_text() == "path 1"
    assert not (tmp_path / ".pending").exists()
    fake.fail = False
    run_compare(QUICK, ["path"], tmp_path, overwrite=True)
    assert _assert_whole(tmp_path) == 3


def test_a_budget_too_small_is_refused_in_readable_bytes(monkeypatch):
    import sys
    import types

    module = types.ModuleType("fake_sized_row")
    module.min_memory = lambda settings: 256 << 20
    monkeypatch.setitem(sys.modules, "fake_sized_row", module)

    def run(ctx):
        return None

    run.__module__ = "fake_sized_row"
    monkeypatch.setattr(runner, "load_row", lambda name: Row(name, name, run, 0.1))
    with pytest.raises(runner.SettingError, match=r"memory budget 1 byte is too small"):
        runner.check_settings(Settings(memory_budget=1), ["cost"])
    with pytest.raises(runner.SettingError, match=r"memory budget 1,234 bytes is too small"):
        runner.check_settings(Settings(memory_budget=1234), ["cost"])


def test_the_shortest_sequence_is_defined_once():
    import inspect

    from qkv.compare import cost, measure, scale

    assert runner.SMALLEST_N is cost.SMALLEST_N is scale.SMALLEST_N is measure.SMALLEST_N == 256
    for module in (runner, cost, scale):
        assert "SMALLEST_N = " not in inspect.getsource(module), module.__name__


def test_a_budget_over_the_machines_memory_is_refused_for_rows_that_use_it(tmp_path, fake,
                                                                          monkeypatch):
    from qkv.bench import cpu

    monkeypatch.setattr(cpu, "machine_memory_bytes", lambda: 3 << 30)
    with pytest.raises(runner.SettingError, match=r"memory budget 8GiB is more than the 3.22 GB "
                                                  r"this machine has available; pick at most "
                                                  r"3072MiB") as error:
        run_compare(QUICK, ["path", "cost"], tmp_path / "out")
    assert error.value.setting == "memory_budget" and fake.runs["cost"] == 0
    assert not (tmp_path / "out").exists()
    run_compare(QUICK, ["path"], tmp_path / "out")  # path does not use the budget
    run_compare(Settings(quick=True, memory_budget=2 << 30), ["cost"], tmp_path / "out")
    assert fake.runs == {"cost": 1, "path": 1}
