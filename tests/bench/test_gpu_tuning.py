"""benchmarks/gpu_tuning.py on the CPU: the decode-threshold rule on synthetic timings, the
ranking and markdown, and dry runs of the measuring (real calls at tiny sizes, the timer faked,
the triton kernels in the interpreter)."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
registry = importlib.import_module("qkv.attention.registry")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tuning = _load("gpu_tuning")
needs_triton = pytest.mark.skipif("triton" not in registry.backends("cpu"),
                                  reason="triton backend not usable on the CPU")


def synthetic(speedups: dict[int, dict[int, float]]) -> list[dict]:
    """Rows with plain_ms / split_ms = the given speedup per (Lq, Lk)."""
    return [dict(lq=lq, lk=lk, plain_ms=s, split_ms=1.0, split_used=True, error=None)
            for lq, by_lk in speedups.items() for lk, s in by_lk.items()]


def test_threshold_is_where_split_wins_from_on():
    rows = synthetic({
        1: {256: 0.8, 512: 1.1, 1024: 1.5, 4096: 3.0},   # wins from 512
        4: {256: 1.2, 512: 0.9, 1024: 1.05, 4096: 2.0},  # a win at 256, a loss at 512: 1024
        16: {256: 0.5, 512: 0.7, 1024: 0.9, 4096: 0.95},  # never
    })
    rows.append(dict(lq=8, lk=256, plain_ms=None, split_ms=None, error="RuntimeError: x"))
    found = tuning.split_thresholds(rows)
    assert found == {1: 512, 4: 1024, 8: None, 16: None}
    rule = tuning.threshold_rule(found, tuning.timed_lqs(rows))
    assert rule.startswith("DECODE_MIN_LK = 1024 is right for every Lq in [1, 4]")
    assert "never won for Lq in [16], so DECODE_MAX_LQ should be below 16" in rule  # 8: no data
    assert "| 8 | - | - | - | - | not measured |" in tuning.markdown(rows, [])
    assert "keep it off" in tuning.threshold_rule({1: None})


def test_ranking_and_markdown():
    rank = [dict(kind="plain", provider=p, mode="fwd", ms=ms, error=None)
            for p, ms in (("triton", 1.0), ("sdpa", 0.8), ("sdpa:cudnn", 0.7))]
    rank.append(dict(kind="plain", provider="sdpa:flash", mode="fwd", ms=None,
                     error="RuntimeError: no kernel"))
    (r,) = tuning.ranking(rank)
    assert r["order"] == ["sdpa:cudnn", "sdpa", "triton"]
    assert r["triton_vs_best_other"] == pytest.approx(1.0 / 0.7)
    md = tuning.markdown(synthetic({1: {512: 0.5, 1024: 2.0}}), rank)
    assert "| 1 | 0.50 | 2.00 | 1024 |" in md and "DECODE_MIN_LK = 1024" in md
    assert "| plain | fwd | 1.000 | 0.800 | - | 0.700 | sdpa:cudnn, sdpa, triton | 1.43 |" in md
    assert "- sdpa:flash plain fwd: RuntimeError: no kernel" in md


def test_write_keeps_json_and_markdown(tmp_path):
    import json

    md = tuning.write(tmp_path, synthetic({2: {1024: 1.5}}), [], {"gpu": "fake"})
    data = json.loads((tmp_path / "gpu_tuning.json").read_text())
    assert data["split_wins_from"] == {"2": 1024} and data["environment"]["gpu"] == "fake"
    assert (tmp_path / "gpu_tuning.md").read_text() == md


@needs_triton
def test_dry_run_of_the_threshold_forces_each_path_and_restores_it():
    function = importlib.import_module("qkv.attention.triton.function")
    before = function.DECODE_MIN_LK
    times = iter(range(1, 100))
    rows = tuning.threshold_rows((1, 2), (32, 80), batch=1, heads=2, kv_heads=1, head_dim=16,
                                 dtype=torch.float32, device="cpu",
                                 timer=lambda fn: fn() is not None and float(next(times)))
    assert before == function.DECODE_MIN_LK
    assert [(r["lq"], r["lk"]) for r in rows] == [(1, 32), (1, 80), (2, 32), (2, 80)]
    assert all(r["error"] is None and r["split_used"] for r in rows), rows
    assert all(r["split_ms"] < r["plain_ms"] for r in rows)  # split is timed first


@needs_triton
def test_forced_paths_give_the_same_result():
    import qkv

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 2, 16, generator=g)
    k, v = (torch.randn(1, 2, 70, 16, generator=g) for _ in range(2))
    outs = []
    for split in (True, False):
        with tuning.decode_path(split) as launches:
            outs.append(qkv.attention(q, k, v, causal=True, backend="triton"))
        assert bool(launches) == split
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_every_call_kind_builds_its_inputs():
    for kind in tuning.CALL_KINDS:
        (q, k, v), kw = tuning._call_inputs(kind, "cpu", torch.float32, scale=64)
        out = __import__("qkv").attention(q, k, v, backend="reference", **kw)
        assert out.shape == q.shape and torch.isfinite(out).all(), kind


def test_dry_run_of_the_ranking_records_what_cannot_run():
    providers = ["chunked", "sdpa", "sdpa:flash", "sdpa:cudnn"]
    if "triton" in registry.backends("cpu"):
        providers.insert(0, "triton")
    rows = tuning.rank_rows(("plain", "gqa_decode"), providers, dtype=torch.float32,
                            device="cpu", timer=lambda fn: fn() is None or 1.0, scale=64)
    by = {(r["kind"], r["provider"], r["mode"]): r for r in rows}
    assert ("gqa_decode", "sdpa", "fwd_bwd") not in by  # decode is forward only
    assert by[("plain", "sdpa", "fwd_bwd")]["ms"] == 1.0
    assert by[("plain", "chunked", "fwd")]["ms"] == 1.0
    assert by[("plain", "sdpa:cudnn", "fwd")]["error"]  # no cuDNN kernel on the CPU


def test_warm_runs_its_share_and_counts_failures(monkeypatch, capsys):
    ran = []

    def task(name, fail=False):
        def run():
            ran.append(name)
            if fail:
                raise RuntimeError("boom")
            return [dict(error=None)]
        return name, run

    monkeypatch.setattr(tuning, "warm_tasks", lambda: [task("a"), task("b", True), task("c"),
                                                       task("d")])
    assert tuning.warm(1, 2) == 1 and ran == ["b", "d"]
    assert "warm b" in capsys.readouterr().out


def test_warm_tasks_cover_the_sweep_and_this_script():
    names = [n for n, _ in tuning.warm_tasks()]
    assert sum(n.startswith("sweep d=") for n in names) == 4 and "sweep decode" in names
    assert {f"threshold Lq={lq}" for lq in tuning.LQS} <= set(names)
    assert {f"rank {k}" for k in tuning.CALL_KINDS} <= set(names)


def test_main_needs_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a machine without CUDA")
    assert tuning.main(["--out", "unused"]) == 1
    assert "needs CUDA" in capsys.readouterr().err
