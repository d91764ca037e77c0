"""`qkv compare` from the command line: bad input is one error line, exit 2 and nothing on disk;
a quick run end to end writes its report, results and plots."""

import json
import os
import re

import pytest
from typer.testing import CliRunner

import qkv.compare.runner as runner
from qkv.cli.main import app
from qkv.compare import ROW_NAMES, Row, RowResult, Settings

UNWRITABLE = "/proc/qkv-no-such-folder"


def _one_error_line(result, words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert words in lines[0], lines[0]
    assert result.stdout == "" and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, words", [
    (["--only", "nope"], "unknown row 'nope'"),
    (["--only", "cost,magic"], "unknown row 'magic'"),
    (["--memory", "lots"], "--memory: it must be a size such as 8GiB"),
    (["--memory", "1KiB"], "too small for even the smallest case"),
    (["--max-len", "100"], "max_len must be at least 256"),
    (["--seed", "-1"], "seed must be an integer >= 0"),
    (["--out", "{tmp}/blocker"], "is not a folder"),
    (["--out", "{tmp}/blocker/sub"], "blocker/sub"),
    (["--out", UNWRITABLE], UNWRITABLE),
])
def test_bad_input_is_one_error_line_and_leaves_nothing(args, words, tmp_path):
    (tmp_path / "blocker").write_text("a file\n")
    before = sorted(tmp_path.rglob("*"))
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the default --out would be created here
    try:
        result = CliRunner().invoke(app, ["compare", "--only", "cost",
                                          *[a.replace("{tmp}", str(tmp_path)) for a in args]])
    finally:
        os.chdir(cwd)
    _one_error_line(result, words)
    assert sorted(tmp_path.rglob("*")) == before


def test_help_says_the_seed_does_not_change_cost_and_scale():
    result = CliRunner().invoke(app, ["compare", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.stdout.replace("│", " ").split())
    assert "cost and scale rows always use seed 0" in text, text


def test_the_options_are_named_in_the_error(tmp_path):
    result = CliRunner().invoke(app, ["compare", "--memory", "lots", "--out", str(tmp_path)])
    assert "Invalid value for --memory" in result.stderr


def _fake_load(name):
    def run(ctx):
        ctx.progress("working", 1, 2)
        return RowResult(claim="c", anchor="a", findings="f", agrees=True,
                         headline=f"{name} numbers", data={"n": 1})

    return Row(name=name, title=name, run=run, minutes=0.0)


@pytest.mark.parametrize("only", [",,", " , ", ""])
def test_only_naming_no_row_is_refused(only, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "load_row", _fake_load)  # were every row to run, fast
    result = CliRunner().invoke(app, ["compare", "--only", only, "--out", str(tmp_path / "o")])
    _one_error_line(result, "--only")
    assert "no row named" in result.stderr
    assert not (tmp_path / "o").exists()


def test_a_seed_too_large_for_torch_is_refused_naming_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "load_row", _fake_load)
    result = CliRunner().invoke(app, ["compare", "--only", "path", "--seed",
                                      "99999999999999999999", "--out", str(tmp_path / "o")])
    _one_error_line(result, "--seed")
    assert "at most" in result.stderr and not (tmp_path / "o").exists()


def test_a_budget_over_the_machines_memory_is_refused_naming_memory(tmp_path, monkeypatch):
    from qkv.bench import cpu

    def load(name):  # fast, were it to run
        return Row(**{**vars(_fake_load(name)), "depends_on": ("quick", "memory_budget")})

    monkeypatch.setattr(runner, "load_row", load)
    monkeypatch.setattr(cpu, "machine_memory_bytes", lambda: 1 << 30)
    result = CliRunner().invoke(app, ["compare", "--only", "cost", "--memory", "8GiB", "--out",
                                      str(tmp_path / "o")])
    _one_error_line(result, "--memory: memory budget 8GiB is more than the 1.07 GB")
    assert not (tmp_path / "o").exists()


def test_the_default_budget_is_clamped_to_the_machines_memory(tmp_path, monkeypatch):
    from qkv.bench import cpu

    def load(name):
        return Row(**{**vars(_fake_load(name)), "depends_on": ("quick", "memory_budget")})

    monkeypatch.setattr(runner, "load_row", load)
    monkeypatch.setattr(cpu, "machine_memory_bytes", lambda: 5 << 30 | 12345)
    result = CliRunner().invoke(app, ["compare", "--only", "cost", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "warning: this machine has 5.37 GB of memory available, less than the default budget "
        "8GiB: using --memory 5GiB"]
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["memory_budget"] == (
        5 << 30)


def test_a_killed_measuring_process_is_one_error_line(tmp_path, monkeypatch):
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from qkv.compare import measure

    class DeadPool:
        def submit(self, function, case):
            future = Future()
            future.set_exception(BrokenProcessPool("terminated abruptly"))
            return future

    def load(name):
        return Row(name=name, title=name, minutes=0.0,
                   run=lambda ctx: measure.run_elsewhere(print, "case n=16384", DeadPool()))

    monkeypatch.setattr(runner, "load_row", load)
    result = CliRunner().invoke(app, ["compare", "--only", "path", "--out", str(tmp_path)])
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the process measuring case n=16384 "
                                                   "died"), result.stderr


def test_other_settings_in_the_folder_are_refused_untouched(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "load_row", _fake_load)
    out = tmp_path / "out"
    ok = CliRunner().invoke(app, ["compare", "--only", "cost", "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert f"report: {out / 'report.md'}" in ok.stdout and "cost: cost numbers" in ok.stdout
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = CliRunner().invoke(app, ["compare", "--only", "cost", "--seed", "1", "--out",
                                   str(out)])
    _one_error_line(bad, "seed 0 there, 1 now")
    assert "--overwrite" in bad.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    again = CliRunner().invoke(app, ["compare", "--only", "cost", "--seed", "1", "--overwrite",
                                     "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "results.json").read_text())["seed"] == 1


def test_ctrl_c_says_how_to_resume(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_compare", interrupted)
    result = CliRunner().invoke(app, ["compare", "--only", "cost", "--out", str(tmp_path)])
    assert result.exit_code == 130
    assert "run the same command again to resume" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_quick_run_writes_report_results_and_every_plot(tmp_path):
    """`qkv compare --quick`, every row (about 25 s on one quiet core)."""
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compare", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["settings"] == Settings(quick=True).as_dict()
    assert results["threads"] == 1
    for index, name in enumerate(ROW_NAMES, 1):
        record = results["rows"][name]
        assert record["result"]["data"], name
        assert record["seconds"] > 0
        assert f"## {index}. " in report and f"(`{name}`)" in report
        for figure in record["result"]["figures"]:
            assert (out / figure).stat().st_size > 0, figure
    for figure in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (out / figure).exists(), figure
    assert not (out / ".pending").exists()
    assert "## Summary" in report and "Reproduce with:" in report
