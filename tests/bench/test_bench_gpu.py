"""The GPU sweep's writers (JSON, markdown, PNG) on a tiny fake result list; no GPU needed."""

from __future__ import annotations

import json

import pytest

from qkv.bench import gpu as bench


def fake_gpu_rows():
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
    md = bench.markdown_table(fake_gpu_rows())
    assert "| 128 | yes | 1024 | fwd | 300.0 | 240.0 | 360.0 |" in md
    assert "0.83" in md  # triton / best sdpa = 300 / 360
    assert "3000 (0.70)" in md
    assert "sdpa-efficient d=128 n=1024: RuntimeError: no kernel" in md


def test_write_all_creates_json_markdown_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = fake_gpu_rows()
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
