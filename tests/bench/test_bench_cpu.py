"""`qkv bench` on the CPU: a tiny sweep end to end, and the table's arithmetic."""

import json

from typer.testing import CliRunner

from qkv.bench import cpu
from qkv.cli.main import app


def test_cli_runs_a_tiny_sweep_and_writes_results(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--device", "cpu", "--n", "128", "--reps", "1",
                                      "--backend", "sdpa", "--backend", "chunked",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {(r["backend"], r["mode"], r["causal"]) for r in rows} == {
        (b, m, c) for b in ("sdpa", "chunked") for m in ("fwd", "fwd_bwd") for c in (False, True)
    }
    assert all(r["seconds"] > 0 and r["peak_bytes"] >= 0 for r in rows)
    assert all("time_vs_sdpa" in r for r in rows)
    assert "| 128 | fwd | False | chunked |" in (tmp_path / "results.md").read_text()
    table = [line for line in result.output.splitlines() if line.startswith("|")]
    assert "vs sdpa" in table[0] and not any("torch" in line for line in table)


def test_timing_only_sweep_runs_in_process(monkeypatch):
    def no_subprocess(case, timeout=0):
        raise AssertionError("a timing-only sweep must not start a process per case")

    monkeypatch.setattr(cpu, "measure", no_subprocess)
    result = CliRunner().invoke(app, ["bench", "--device", "cpu", "--n", "64", "--reps", "1",
                                      "--backend", "sdpa", "--backend", "chunked",
                                      "--no-memory"])
    assert result.exit_code == 0, result.output
    assert "| 64 | fwd_bwd | True | chunked |" in result.output
    assert "not measured" in result.output


def test_cli_rejects_unknown_backend_and_device():
    runner = CliRunner()
    bad = runner.invoke(app, ["bench", "--device", "cpu", "--backend", "magic"])
    assert bad.exit_code == 2 and "magic" in bad.output and "sdpa" in bad.output
    bad = runner.invoke(app, ["bench", "--device", "cpu", "--backend", "torch"])
    assert bad.exit_code == 2 and "'torch'" in bad.output  # the kernel's name is "sdpa"
    bad = runner.invoke(app, ["bench", "--device", "tpu"])
    assert bad.exit_code == 1 and "tpu" in bad.output


def test_ratios_and_causal_speedups():
    rows = [
        {"n": 64, "mode": "fwd", "causal": c, "backend": b, "seconds": s, "peak_bytes": 10,
         "score_matrix_bytes": 1000, "tflops": 1.0}
        for b, c, s in (("sdpa", False, 2.0), ("chunked", False, 3.0), ("chunked", True, 1.5),
                        ("sdpa", True, 1.0))
    ]
    rows.append({"n": 64, "mode": "fwd", "causal": False, "backend": "reference",
                 "skipped": "too big"})
    rows = cpu.add_ratios(rows)
    assert rows[1]["time_vs_sdpa"] == 1.5
    assert cpu.causal_speedups(rows)[("chunked", 64, "fwd")] == 2.0
    table = cpu.markdown_table(rows)
    assert "1.50×" in table and "skipped: too big" in table and "1.00%" in table


def test_reference_memory_guard():
    small = cpu.CpuCase(n=1024, backend="reference")
    big = cpu.CpuCase(n=16384, backend="reference", mode="fwd_bwd")
    assert cpu.reference_fits(small, 12e9) and not cpu.reference_fits(big, 12e9)
