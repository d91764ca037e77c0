"""`qkv bench` from the command line: the CPU sweep end to end, and the CUDA path's flags
reaching the GPU sweep (faked; no GPU needed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qkv.bench import cpu
from qkv.bench import gpu as bench
from qkv.cli.main import app
from tests.bench.test_bench_gpu import fake_gpu_rows


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

def test_cli_passes_reps_sizes_and_backends_to_the_gpu_sweep(tmp_path, monkeypatch):
    calls = []

    def fake_sweep(out_dir=None, **kwargs):
        calls.append((out_dir, kwargs))
        return fake_gpu_rows()

    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "run_gpu_sweep", fake_sweep)
    result = CliRunner().invoke(app, ["bench", "--device", "cuda", "--reps", "5", "--n", "2048",
                                      "--n", "8192", "--backend", "qkv-triton",
                                      "--backend", "sdpa-flash", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert calls == [(tmp_path, dict(quick=False, seqlens=[2048, 8192],
                                     providers=["qkv-triton", "sdpa-flash"], reps=5))]
    assert "| 128 | yes | 1024 | fwd |" in result.output
    calls.clear()
    assert CliRunner().invoke(app, ["bench", "--device", "cuda", "--quick"]).exit_code == 0
    assert calls == [(None, dict(quick=True, seqlens=None, providers=None, reps=bench.GPU_REPS))]

def test_cli_rejects_cpu_backend_names_on_cuda(monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "run_gpu_sweep", lambda *a, **k: pytest.fail("ran the sweep"))
    result = CliRunner().invoke(app, ["bench", "--device", "cuda", "--backend", "chunked"])
    assert result.exit_code == 2 and "'chunked'" in result.output and "qkv-triton" in result.output

def test_cli_measures_on_the_cuda_device_it_names(monkeypatch):
    chosen = []
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(bench.torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(bench, "run_gpu_sweep", lambda *a, **k: fake_gpu_rows())
    assert CliRunner().invoke(app, ["bench", "--device", "cuda:1"]).exit_code == 0
    assert [str(d) for d in chosen] == ["cuda:1"]
    result = CliRunner().invoke(app, ["bench", "--device", "cuda:2"])
    assert result.exit_code == 1 and "2 CUDA device(s)" in result.stderr



@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_script_says_it_needs_cuda():
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "benchmarks/attention_gpu.py", "--quick"], cwd=root,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: attention_gpu.py needs CUDA, and this machine has none"]


def test_gpu_script_passes_its_options_to_the_sweep(tmp_path, monkeypatch, capsys):
    """benchmarks/attention_gpu.py (argparse, no CLI packages needed) runs the same sweep."""
    import importlib.util

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("attention_gpu",
                                                  root / "benchmarks" / "attention_gpu.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    calls = []
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "run_gpu_sweep", lambda out, **kw: calls.append((out, kw))
                        or fake_gpu_rows())
    out = tmp_path / "o"
    assert script.main(["--out", str(out), "--n", "2048", "--reps", "3",
                        "--provider", "qkv-triton", "--provider", "sdpa-cudnn"]) == 0
    assert calls == [(str(out), dict(quick=False, seqlens=[2048], reps=3,
                                     providers=["qkv-triton", "sdpa-cudnn"]))]
    assert out.is_dir() and "| 128 | yes | 1024 | fwd |" in capsys.readouterr().out


@pytest.mark.parametrize("memory", ["--memory", "--no-memory"])
def test_a_size_beyond_the_machine_is_a_skipped_row(memory):
    result = CliRunner().invoke(app, ["bench", "--device", "cpu", "--n", "50000000", "--reps",
                                      "1", "--backend", "sdpa", "--backend", "chunked",
                                      "--backend", "reference", memory])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    rows = [line for line in result.output.splitlines() if "| 50000000 |" in line]
    assert len(rows) == 12 and all("skipped: needs > " in line for line in rows)
    assert "e+" not in result.output and "320000000.0" not in result.output
