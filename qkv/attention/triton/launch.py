"""Kernel launching: autotuned on CUDA, a fixed block size under TRITON_INTERPRET=1.

Tuning is keyed on length buckets, not on exact lengths: a call is tuned once per (kernel, head
dim family, bucket of Lq, bucket of Lk, the flags in `_KEY`, the tensors' dtypes), where
bucket(n) = max(LENGTH_BUCKET_FLOOR, next power of two of n). The floor is the smallest tile
side of any config (32): up to it every config covers the whole length with one block, so the
configs rank alike. Lengths 1..32 share one bucket, 33..64 the next, 65..128 the next, and so
on: lengths up to 2^k (k >= 5) fall in k - 4 buckets, so the tunings of a kernel grow with the
logarithm of the longest length, not with how many distinct lengths run (each generation step,
each new batch length in training). Only the key is bucketed: the kernels still receive the
exact Lq and Lk, which alone drive masking, bounds and the grid, so results do not depend on the
bucket or on which length tuned it. Each bucket holds its own `triton.autotune` wrapper of the
same kernel (compiled binaries are shared), whose key leaves the lengths out. Decode
(kernels_decode) is not autotuned: it runs one fixed config. The cost: within a bucket the
config is the best for whichever length tuned it, not for each length.
"""

from __future__ import annotations

import os

import triton

# Fixed block sizes under the interpreter (the autotuner needs a GPU to time with).
INTERPRET_BLOCK = 16
# (BLOCK_M, BLOCK_N) of the main kernels there; tests also run unequal pairs, as the GPU's
# autotuned configs are.
INTERPRET_BLOCKS = (INTERPRET_BLOCK, INTERPRET_BLOCK)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on the CPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def pow2(n: int) -> int:
    """Padded head dim: the next power of two, at least 16 (the smallest tl.dot size)."""
    return max(16, triton.next_power_of_2(n))


def bhl_strides(t, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, row) strides: padded (B, H, L, D), or packed (total, H, D) with batch 0."""
    if varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def _configs(pairs, d: int):
    """Configs from (BLOCK_M, BLOCK_N, warps, stages); wide heads get the smaller tiles."""
    out = []
    for bm, bn, w, s in pairs:
        if d > 128 and bm * bn > 64 * 64:
            continue
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return out


FWD_PAIRS = [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 2),
              (128, 32, 8, 2)]
BWD_PAIRS = [(64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (32, 128, 8, 2), (64, 32, 4, 2),
              (128, 64, 8, 2)]
# The smallest tile side of any config: lengths up to it tune alike.
LENGTH_BUCKET_FLOOR = min(min(bm, bn) for bm, bn, _, _ in FWD_PAIRS + BWD_PAIRS)
# Keys inside one length bucket (the autotuner adds the tensors' dtypes); a kernel without one
# of these arguments ignores it.
_KEY = ["BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "HAS_BIAS", "HAS_MASK", "HAS_DROPOUT", "DELTA_PASS"]
_TUNED: dict = {}


def length_bucket(n: int) -> int:
    """The tuning bucket of a sequence length: the next power of two, at least the floor."""
    return max(LENGTH_BUCKET_FLOOR, triton.next_power_of_2(n))


def tuner(kernel, pairs, prob):
    """The autotuned wrapper of `kernel` for the length buckets and head dims of `prob`."""
    family = "wide" if prob.block_d > 128 or prob.block_dv > 128 else "narrow"
    key = (getattr(kernel, "fn", kernel).__name__, family,
           length_bucket(prob.shape["Lq"]), length_bucket(prob.shape["Lk"]))
    if key not in _TUNED:
        _TUNED[key] = triton.autotune(configs=_configs(pairs, max(prob.block_d, prob.block_dv)),
                                      key=_KEY)(kernel)
    return _TUNED[key]


def launch(kernel, grid_fn, pairs, prob, *args, **kwargs):
    """Run `kernel` on `args` and `kwargs` (all but BLOCK_M and BLOCK_N).

    grid_fn(BLOCK_M, BLOCK_N) -> grid. Autotuned on CUDA over `pairs`, once per length bucket
    (module docstring); fixed blocks under the interpreter.
    """
    if interpreting():
        bm, bn = INTERPRET_BLOCKS
        kernel[grid_fn(bm, bn)](*args, **kwargs, BLOCK_M=bm, BLOCK_N=bn)
        return
    tuner(kernel, pairs, prob)[lambda meta: grid_fn(meta["BLOCK_M"], meta["BLOCK_N"])](
        *args, **kwargs)
