"""The GPU sweep's targets table, ratio columns and step order, on fake results, and a dry run of
its measuring functions on the CPU (the timer faked, the triton kernels in the interpreter)."""

from __future__ import annotations

import importlib

import pytest
import torch

from qkv.bench import gpu as bench

registry = importlib.import_module("qkv.attention.registry")


def _train(provider, d, n, causal, mode, tflops):
    return bench._row(kind="train", provider=provider, mode=mode, head_dim=d, seqlen=n,
                      causal=causal, ms=1.0, tflops=tflops)


def _decode(provider, cache, gbps):
    return bench._row(kind="decode", provider=provider, mode="decode", head_dim=128,
                      seqlen=cache, ms=0.1, gbps=gbps, frac_copy=gbps / 4000)


def fake_results():
    rows = []
    for d in (64, 128):
        for n in (2048, 4096, 8192):
            for causal in (False, True):
                # triton: forward 0.95x cuDNN non-causal (met), 0.80x causal at 8k (missed)
                fwd = 0.80 if causal and n == 8192 else 0.95
                rows += [_train("sdpa-cudnn", d, n, causal, "fwd", 500.0),
                         _train("qkv-triton", d, n, causal, "fwd", 500.0 * fwd),
                         _train("sdpa-flash", d, n, causal, "bwd", 300.0),
                         _train("qkv-triton", d, n, causal, "bwd", 300.0 * 1.25),
                         _train("sdpa-cudnn", d, n, causal, "bwd", 450.0)]
    for cache, ratio in ((8192, 0.5), (32768, 0.95), (131072, 0.92)):
        rows += [_decode("sdpa-cudnn", cache, 4000.0), _decode("qkv-triton", cache, 4000 * ratio)]
    return rows


def test_targets_are_met_or_missed_over_the_sizes_they_cover():
    rows = {(r["what"], r["head_dim"]): r for r in bench.target_rows(fake_results())}
    assert len(rows) == 9  # four training targets at d = 64 and 128, decode once
    fwd = rows[("forward, non-causal", 128)]
    assert fwd["status"] == "met" and fwd["ratios"] == {4096: 0.95, 8192: 0.95}  # n >= 4k only
    causal = rows[("forward, causal", 64)]
    assert causal["status"] == "missed" and causal["worst"] == pytest.approx(0.80)
    assert rows[("backward, causal", 128)]["status"] == "met"
    assert rows[("backward, causal", 128)]["baseline"] == "sdpa-flash"
    dec = rows[("decode bandwidth", 128)]
    assert dec["status"] == "met" and set(dec["ratios"]) == {32768, 131072}  # not the 8k cache
    assert dec["worst"] == pytest.approx(0.92)
    md = bench.targets_markdown(list(rows.values()))
    assert "| forward, causal | 64 | sdpa-cudnn | >= 4k | >= 0.85x | 0.80 | 4k: 0.95, 8k: 0.80 " \
           "| missed |" in md
    assert "| decode bandwidth | 128 | sdpa-cudnn | >= 32k | >= 0.90x | 0.92 |" in md


def test_targets_without_data_say_not_measured():
    rows = bench.target_rows([_train("qkv-triton", 128, 4096, False, "fwd", 400.0)])
    assert {r["status"] for r in rows} == {"not measured"}
    assert "Targets" not in bench.markdown_table([])


def test_markdown_gives_ratios_to_cudnn_and_flash_and_the_targets():
    md = bench.markdown_table(fake_results())
    # d=128 causal n=8192 fwd: triton 400, cuDNN 500 -> 0.80 of cuDNN, no flash row in fwd
    assert "| 128 | yes | 8192 | fwd | 400.0 | - | 500.0 | 0.80 | 0.80 | - |" in md
    # bwd: triton 375 against flash 300 -> 1.25, cuDNN 450 -> 0.83 (best sdpa = cuDNN)
    assert "| 128 | no | 4096 | bwd | 375.0 | 300.0 | 450.0 | 0.83 | 0.83 | 1.25 |" in md
    assert "| 32768 | 3800 (0.95) | - | 4000 (1.00) | 0.95 |" in md
    assert md.index("| target | d |") > md.index("| cache |")


def test_sweep_runs_decode_first_and_writes_after_each_part(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "environment", lambda: {"gpu": "fake"})
    monkeypatch.setattr(bench, "copy_bandwidth_gbps", lambda: 4000.0)
    monkeypatch.setattr(bench.torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench, "bench_decode", lambda p, cache, copy, reps: (
        calls.append(("decode", cache)) or _decode(p, cache, 3000.0)))
    monkeypatch.setattr(bench, "bench_training", lambda p, d, n, causal, reps: (
        calls.append(("train", d, causal)) or [_train(p, d, n, causal, "fwd", 1.0)]))
    monkeypatch.setattr(bench, "write_all", lambda results, out, env: calls.append(
        ("write", len(results))))
    bench.run_gpu_sweep(tmp_path, quick=True, providers=["qkv-triton"])
    kinds = [c[0] for c in calls]
    assert kinds[:3] == ["decode", "decode", "write"]
    assert [c[1] for c in calls if c[0] == "train"][0] == 128  # d = 128 before d = 64
    assert kinds.count("write") == 5 and kinds[-1] == "write"


def test_dry_run_of_the_measuring_functions_on_the_cpu(monkeypatch):
    """The real provider calls at a tiny size on CPU tensors; only the timer is faked. cuDNN
    cannot run on the CPU: its rows carry the error instead of failing the sweep."""
    called = []
    monkeypatch.setattr(bench, "_bench", lambda fn, grad_to_none=None, reps=1: (
        called.append(fn()) or 2.0))
    providers = ["sdpa-flash", "sdpa-cudnn"]
    if "triton" in registry.backends("cpu"):
        providers.append("qkv-triton")
    rows = []
    for p in providers:
        rows += bench.bench_training(p, 16, 32, True, dtype=torch.float32, device="cpu",
                                     tokens=32, width=32)
        rows.append(bench.bench_decode(p, 64, 100.0, batch=1, heads=4, kv_heads=2, head_dim=16,
                                       dtype=torch.float32, device="cpu"))
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert by[("sdpa-flash", "fwd")]["tflops"] > 0 and by[("sdpa-flash", "decode")]["gbps"] > 0
    assert by[("sdpa-cudnn", "fwd")]["error"] and by[("sdpa-cudnn", "decode")]["error"]
    if "qkv-triton" in providers:
        assert by[("qkv-triton", "bwd")]["ms"] == 2.0 and not by[("qkv-triton", "bwd")]["error"]
    assert called
