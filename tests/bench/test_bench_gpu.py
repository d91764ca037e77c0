"""The GPU sweep's writers (JSON, markdown, PNG) on a tiny fake result list; no GPU needed."""

from __future__ import annotations

import json

import pytest

from qkv.bench import gpu as bench


def _fake():
    rows = []
    for p, scale in (("qkv-triton", 1.0), ("sdpa-flash", 0.8), ("sdpa-cudnn", 1.2)):
        for mode in bench.MODES:
            rows.append(bench._row(kind="train", provider=p, mode=mode, head_dim=128,
                                   seqlen=1024, causal=True, batch=16, heads=16, kv_heads=16,
                                   ms=1.0, tflops=300.0 * scale))
        rows.append(bench._row(kind="decode", provider=p, mode="decode", head_dim=128,
                               seqlen=8192, batch=8, heads=32, kv_heads=8, ms=0.1,
                               gbps=3000.0 * scale, frac_copy=0.7 * scale))
    rows.append(bench._row(kind="train", provider="sdpa-efficient", mode="fwd", head_dim=128,
                           seqlen=1024, causal=True, error="RuntimeError: no kernel"))
    return rows


def test_markdown_table_lists_providers_ratio_and_errors():
    md = bench.markdown_table(_fake())
    assert "| 128 | yes | 1024 | fwd | 300.0 | 240.0 | 360.0 |" in md
    assert "0.83" in md  # triton / best sdpa = 300 / 360
    assert "3000 (0.70)" in md
    assert "sdpa-efficient d=128 n=1024: RuntimeError: no kernel" in md


def test_write_all_creates_json_markdown_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = _fake()
    bench.write_all(rows, tmp_path, {"gpu": "fake"})
    data = json.loads((tmp_path / "attention_gpu.json").read_text())
    assert data["environment"]["gpu"] == "fake" and len(data["results"]) == len(rows)
    assert (tmp_path / "attention_gpu.md").read_text().startswith("| d |")
    assert (tmp_path / "attention_gpu.png").stat().st_size > 1000
    assert not list(tmp_path.glob("*.tmp*"))


def test_sweep_refuses_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA"):
        bench.run_gpu_sweep(tmp_path, quick=True)


def test_cli_passes_reps_sizes_and_backends_to_the_gpu_sweep(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from qkv.cli.main import app

    calls = []

    def fake_sweep(out_dir=None, **kwargs):
        calls.append((out_dir, kwargs))
        return _fake()

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
    from typer.testing import CliRunner

    from qkv.cli.main import app

    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "run_gpu_sweep", lambda *a, **k: pytest.fail("ran the sweep"))
    result = CliRunner().invoke(app, ["bench", "--device", "cuda", "--backend", "chunked"])
    assert result.exit_code == 2 and "'chunked'" in result.output and "qkv-triton" in result.output


def test_cli_measures_on_the_cuda_device_it_names(monkeypatch):
    from typer.testing import CliRunner

    from qkv.cli.main import app

    chosen = []
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(bench.torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(bench, "run_gpu_sweep", lambda *a, **k: _fake())
    assert CliRunner().invoke(app, ["bench", "--device", "cuda:1"]).exit_code == 0
    assert [str(d) for d in chosen] == ["cuda:1"]
    result = CliRunner().invoke(app, ["bench", "--device", "cuda:2"])
    assert result.exit_code == 1 and "2 CUDA device(s)" in result.stderr
