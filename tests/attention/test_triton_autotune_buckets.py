"""Autotuning is keyed on length buckets (launch.py): many lengths, few tunings, exact results.

The tuning path runs on the CPU: `launch.interpreting` is patched to False so launch builds its
`triton.autotune` wrappers, the autotuner's benchmark is a fake that counts its calls (timing
needs a GPU), and the chosen config then runs in Triton's interpreter.
"""

from __future__ import annotations

import importlib
import random

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from triton.runtime.autotuner import Autotuner  # noqa: E402

from ._support import Case, assert_matches, make_inputs, reference_run, run  # noqa: E402

launch = importlib.import_module("qkv.attention.triton.launch")
registry = importlib.import_module("qkv.attention.registry")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif("triton" not in registry.backends(DEV),
                                  reason="triton backend not usable here")


@triton.jit
def _record(OUT, Lq, Lk, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the lengths it was given, the block it was tuned to and its grid size."""
    if tl.program_id(0) == 0:
        tl.store(OUT + 0, Lq)
        tl.store(OUT + 1, Lk)
        tl.store(OUT + 2, BLOCK_M)
        tl.store(OUT + 3, tl.num_programs(0))


class _Prob:
    """What launch reads of a Problem: padded head dims, the lengths the kernels get and the
    dot precision ("ieee" for fp32 inputs)."""

    def __init__(self, lq: int, lk: int, d: int = 64, prec: str = "tf32", dv: int | None = None):
        self.block_d, self.block_dv = d, d if dv is None else dv
        self.shape = {"Lq": lq, "Lk": lk, "PREC": prec}


@pytest.fixture
def tuning(monkeypatch):
    """The autotuned path on any device, with a benchmark that counts its calls. The n-th
    config benchmarked times 1/n, so the last config of each tuning wins."""
    calls = []

    def bench(kernel_call, quantiles):
        calls.append(1)
        t = 1.0 / len(calls)
        return [t, t, t]

    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(launch, "_TUNED", {})
    monkeypatch.setattr(Autotuner, "do_bench", property(lambda self: bench))
    return calls


def _tunings() -> int:
    """Tunings done so far: one cached best config per key of each autotuner."""
    return sum(len(t.cache) for t in launch._TUNED.values())


@pytest.mark.parametrize("n, bucket", [
    (1, 16), (2, 16), (15, 16), (16, 16), (17, 32), (32, 32), (33, 64), (64, 64), (65, 128),
    (127, 128), (128, 128), (129, 256), (1024, 1024), (1025, 2048), (4096, 4096), (4097, 8192),
    (65536, 65536), (65537, 131072)])
def test_length_bucket_edges(n, bucket):
    assert launch.length_bucket(n) == bucket


def test_length_bucket_floor_and_rule():
    """The floor is the smallest tile side of any config; above it the next power of two."""
    sides = [s for cfgs in launch.CONFIGS.values() for bm, bn, _, _ in cfgs for s in (bm, bn)]
    assert launch.LENGTH_BUCKET_FLOOR == min(sides) == 16
    for n in range(1, 5000):
        b = launch.length_bucket(n)
        assert b >= n and b & (b - 1) == 0
        assert b == 16 or b // 2 < n


def _drive(lengths):
    """Launch `_record` through launch's tuning path at each (Lq, Lk); check it got them."""
    out = torch.zeros(4, dtype=torch.int32, device=DEV)
    for lq, lk in lengths:
        launch.launch(_record, lambda bm, bn, lq=lq: (triton.cdiv(lq, bm),), "fwd",
                      _Prob(lq, lk), out, Lq=lq, Lk=lk, BLOCK_D=64, IS_CAUSAL=False)
        got_lq, got_lk, bm, programs = out.tolist()
        assert (got_lq, got_lk) == (lq, lk)  # the exact lengths, not their buckets
        assert programs == triton.cdiv(lq, bm)  # the grid from the exact length


_FWD_64 = launch.CONFIGS[("fwd", "16", 64)]  # the list `_drive`'s calls are tuned over


def test_hundred_lengths_few_tunings(tuning):
    """100 distinct training lengths in 1..2048 (Lq = Lk): one tuning per bucket, 8 at most."""
    lengths = random.Random(0).sample(range(1, 2049), 100)
    _drive([(n, n) for n in lengths])
    buckets = {launch.length_bucket(n) for n in lengths}
    assert len(buckets) <= 8  # 16, 32, ..., 2048
    assert _tunings() == len(buckets)
    assert len(tuning) == len(buckets) * len(_FWD_64)  # every config timed per tuning


def test_generation_steps_few_tunings(tuning):
    """Generation below the decode path: Lq = 1 over a cache growing one key a step, 500..599
    keys: the steps fall in two buckets (512, 1024), so two tunings, not 100."""
    _drive([(1, n) for n in range(500, 600)])
    assert _tunings() == 2
    assert len(tuning) == 2 * len(_FWD_64)


def test_flags_and_head_dims_still_keyed(tuning):
    """Within one length bucket, another flag or head-dim family is still a tuning of its own."""
    out = torch.zeros(4, dtype=torch.int32, device=DEV)
    grid = lambda bm, bn: (1,)  # noqa: E731
    for d, causal in [(64, False), (64, True), (256, False), (64, False)]:
        launch.launch(_record, grid, "fwd", _Prob(40, 50, d), out, Lq=40, Lk=50,
                      BLOCK_D=d, IS_CAUSAL=causal)
    assert _tunings() == 3


@needs_triton
def test_attention_exact_through_tuned_path(tuning):
    """The real forward and backward kernels through the tuning path: two lengths of one
    bucket share each kernel's tuning, and both match the float64 reference (the exact
    lengths mask and bound every tile of the chosen, larger config)."""
    for lq, lk in [(40, 50), (61, 35)]:
        inputs = make_inputs(Case("tuned", B=1, Hq=1, Hk=1, Lq=lq, Lk=lk, D=16, Dv=16))[0]
        kw = {"causal": True}
        got = run("triton", inputs, kw, torch.float32, with_lse=True)
        assert_matches(got, reference_run(inputs, kw, torch.float32, with_lse=True),
                       torch.float32)
    # forward, dQ (delta pass and dQ pass: one key set each) and dK/dV, one bucket each
    assert _tunings() == 4
    assert {key[1:4] for key in launch._TUNED} == {
        (kind, "32", 64) for kind in ("fwd", "dq_delta", "dkdv", "dq")}
