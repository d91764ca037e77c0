"""Autotune config lists per shape family (launch.CONFIGS): launch hands each family's list to
the autotuner, the tuning key keeps the families apart, and the compile check enumerates exactly
those lists. No GPU: `triton.autotune` is replaced by a recorder and nothing runs."""

from __future__ import annotations

import importlib
import itertools

import pytest

triton = pytest.importorskip("triton")

launch = importlib.import_module("qkv.attention.triton.launch")


class _Prob:
    """What launch reads of a Problem: padded head dims, lengths and the dot precision."""

    def __init__(self, d: int, dv: int, prec: str, lq: int = 100, lk: int = 300):
        self.block_d, self.block_dv = d, dv
        self.shape = {"Lq": lq, "Lk": lk, "PREC": prec}


class _Tuned:
    """What the recording autotune returns: indexed by a grid, then called; runs nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.fixture
def handed(monkeypatch):
    """Launch's tuning path with `triton.autotune` recording the configs it is given."""
    got = []

    def autotune(configs, key):
        got.append([(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                    for c in configs])
        return lambda kernel: _Tuned()

    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(launch, "_TUNED", {})
    monkeypatch.setattr(launch.triton, "autotune", autotune)
    return got


def _kernel():
    """A stand-in kernel: launch only reads its name."""
    def _attn_stand_in():
        pass
    return _attn_stand_in


# (padded D, padded Dv, head-dim class): the class is the larger of the two, 64 up to 64.
HEADS = [(16, 16, 64), (32, 64, 64), (64, 64, 64), (128, 128, 128), (64, 128, 128),
         (256, 256, 256), (128, 256, 256)]
PRECS = [("tf32", "16"), ("ieee", "32")]  # fp16 / bf16 inputs, fp32 inputs


@pytest.mark.parametrize("kind", launch.KINDS)
@pytest.mark.parametrize("prec, dtype_class", PRECS)
@pytest.mark.parametrize("d, dv, d_class", HEADS)
def test_launch_hands_the_family_list_to_the_autotuner(handed, kind, prec, dtype_class, d, dv,
                                                      d_class):
    launch.launch(_kernel(), lambda bm, bn: (1,), kind, _Prob(d, dv, prec))
    assert handed == [launch.CONFIGS[(kind, dtype_class, d_class)]]
    (key,) = launch._TUNED
    assert key[1:4] == (kind, dtype_class, d_class)


def test_families_are_tuned_apart_within_a_length_bucket(handed):
    """Same lengths, same kernel: each (kind, dtype class, head-dim class) its own tuning;
    head dims of one class share one."""
    kernel = _kernel()
    for kind, (prec, _), (d, dv, _) in itertools.product(launch.KINDS, PRECS, HEADS):
        launch.launch(kernel, lambda bm, bn: (1,), kind, _Prob(d, dv, prec))
    assert len(launch._TUNED) == len(launch.KINDS) * len(PRECS) * 3


_SINGLE = {("dkdv", "32", 128), ("dq_delta", "32", 128)}


def test_every_family_has_a_list_of_valid_configs():
    assert set(launch.CONFIGS) == set(itertools.product(
        launch.KINDS, launch.DTYPE_CLASSES, launch.HEAD_DIM_CLASSES))
    for family, cfgs in launch.CONFIGS.items():
        # something for the autotuner to choose between, except in the two fp32 families
        # where the compile check found a single config that does not spill
        assert len(cfgs) >= (1 if family in _SINGLE else 2), family
        assert len(set(cfgs)) == len(cfgs), family
        for bm, bn, warps, stages in cfgs:
            assert bm >= 16 and bn >= 16 and bm & (bm - 1) == 0 and bn & (bn - 1) == 0, family
            assert warps in (4, 8) and 1 <= stages <= 4, family


@pytest.mark.parametrize("d, d_class", [(16, 64), (64, 64), (65, 128), (128, 128), (129, 256),
                                        (256, 256)])
def test_head_dim_class(d, d_class):
    assert launch.head_dim_class(d) == d_class


def test_head_dim_class_rejects_wider_heads():
    with pytest.raises(ValueError, match="head dim 512"):
        launch.head_dim_class(512)


def test_compile_check_enumerates_exactly_the_lists():
    """The compile check compiles what autotuning may choose at each (dtype, D), nothing else."""
    cc = importlib.import_module("qkv.attention.triton.compile_check")
    for kernel, kind in cc.KIND.items():
        for dtype, d in itertools.product(cc.DTYPES, cc.HEAD_DIMS):
            got = [(c.block_m, c.block_n, c.num_warps, c.num_stages)
                   for c in cc.cases(kernels=(kernel,), features=("plain",), head_dims=(d,),
                                     dtypes=(dtype,))]
            assert got == launch.CONFIGS[(kind, "32" if dtype == "fp32" else "16", d)]
