"""Kernel launching: autotuned on CUDA, a fixed block size under TRITON_INTERPRET=1.

Config lists. Each autotuned launch kind (the forward "fwd"; the backward's dK/dV kernel "dkdv",
its dQ kernel "dq", and the dQ kernel's delta pass "dq_delta", tuned apart) has one list of
(BLOCK_M, BLOCK_N, warps, stages) per shape family: the dtype class ("16": fp16/bf16 on tensor
cores; "32": fp32 with the ieee dot, on the FMA units) and the head-dim class (64 for padded head
dims up to 64, 128, 256; of the larger of D and Dv). The lists were chosen by compiling
candidates for sm_90 and sm_80 without a GPU (compile_check.py, benchmarks/
triton_compile_check.py) and keeping the largest tiles that spill no register in any feature
set on either target. Where a family had no spill-free candidate (fp32 dQ at D = 128) its list
holds those that spilled least. Registers, not shared memory, bound the tiles: bias + mask is
the feature set that spills first in fp16/bf16, fp32 at 4 warps spills kilobytes, and one
pipeline stage (s1) instead of two often removes a backward kernel's spill. `family(prob)` picks a call's family, `pairs(kind,
prob)` its list.

Tuning is keyed on length buckets, not on exact lengths: a call is tuned once per (kernel, its
family, bucket of Lq, bucket of Lk, the flags in `_KEY`, the tensors' dtypes), where bucket(n) =
max(LENGTH_BUCKET_FLOOR, next power of two of n). The floor is the smallest tile side of any
config (LENGTH_BUCKET_FLOOR, 16): up to it every config covers the whole length with one block,
so the configs rank alike. Lengths 1..floor share one bucket, and each power of two above it
opens the next: lengths up to 2^k fall in k - log2(floor) + 1 buckets, so the tunings of a
kernel grow with the logarithm of the longest length, not with how many distinct lengths run
(each generation step, each new batch length in training). Only the key is bucketed: the
kernels still receive the exact Lq and Lk, which alone drive masking, bounds and the grid, so
results do not depend on the bucket or on which length tuned it. Each bucket holds its own
`triton.autotune` wrapper of the same kernel (compiled binaries are shared), whose key leaves
the lengths out. Decode (kernels_decode) is not autotuned: it runs one fixed config. The cost:
within a bucket the config is the best for whichever length tuned it, not for each length.
"""

from __future__ import annotations

import os

import triton

# Fixed block sizes under the interpreter (the autotuner needs a GPU to time with).
INTERPRET_BLOCK = 16
# (BLOCK_M, BLOCK_N) of the main kernels there; tests also run unequal pairs, as the GPU's
# autotuned configs are.
INTERPRET_BLOCKS = (INTERPRET_BLOCK, INTERPRET_BLOCK)

KINDS = ("fwd", "dkdv", "dq", "dq_delta")
DTYPE_CLASSES = ("16", "32")
HEAD_DIM_CLASSES = (64, 128, 256)
# (kind, dtype class, head-dim class) -> [(BLOCK_M, BLOCK_N, warps, stages)], best guess first.
# dkdv holds a BLOCK_N x D block of dK and dV and walks query blocks of BLOCK_M rows; dq and
# dq_delta hold a BLOCK_M x D block of dQ and walk key blocks of BLOCK_N. Register, spill and
# shared-memory figures: benchmarks/RESULTS.md.
CONFIGS: dict[tuple[str, str, int], list[tuple[int, int, int, int]]] = {
    ("fwd", "16", 64): [(64, 64, 8, 3), (64, 64, 8, 2), (128, 32, 8, 2)],
    ("fwd", "16", 128): [(64, 64, 8, 3), (64, 64, 8, 2), (64, 32, 4, 2)],
    ("fwd", "16", 256): [(16, 64, 4, 2), (16, 32, 8, 2), (16, 32, 8, 1)],
    ("fwd", "32", 64): [(32, 64, 8, 2), (32, 32, 8, 2)],
    ("fwd", "32", 128): [(32, 64, 8, 2), (32, 16, 8, 2)],
    ("fwd", "32", 256): [(32, 16, 8, 2), (16, 16, 8, 2)],
    ("dkdv", "16", 64): [(64, 32, 8, 2), (32, 32, 8, 2)],
    ("dkdv", "16", 128): [(32, 64, 8, 1), (64, 32, 8, 1), (16, 64, 8, 2)],
    ("dkdv", "16", 256): [(32, 32, 8, 1), (16, 32, 8, 1)],
    ("dkdv", "32", 64): [(16, 32, 8, 2), (16, 16, 8, 2)],
    ("dkdv", "32", 128): [(16, 32, 8, 1)],  # every other candidate spilled
    ("dkdv", "32", 256): [(16, 32, 8, 1), (16, 16, 8, 1)],
    ("dq", "16", 64): [(32, 128, 8, 2), (32, 64, 8, 2), (32, 64, 4, 2)],
    ("dq", "16", 128): [(64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2)],
    ("dq", "16", 256): [(32, 64, 8, 2), (16, 32, 8, 2)],
    ("dq", "32", 64): [(16, 64, 8, 2), (16, 64, 4, 2)],
    ("dq", "32", 128): [(16, 32, 8, 1), (16, 64, 4, 2)],  # the least spill found (tens of bytes)
    ("dq", "32", 256): [(16, 32, 8, 1), (16, 16, 8, 1)],
    ("dq_delta", "16", 64): [(128, 32, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2)],
    ("dq_delta", "16", 128): [(32, 128, 8, 2), (32, 64, 8, 2), (32, 64, 4, 2)],
    ("dq_delta", "16", 256): [(128, 32, 8, 1), (64, 32, 8, 1)],
    ("dq_delta", "32", 64): [(32, 32, 8, 2), (16, 64, 8, 2)],
    ("dq_delta", "32", 128): [(16, 16, 8, 2)],  # every other candidate spilled
    ("dq_delta", "32", 256): [(16, 16, 8, 2), (32, 16, 8, 2)],
}


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


def head_dim_class(d: int) -> int:
    """The head-dim class of a (padded) head dim: 64 up to 64, else 128 or 256."""
    if d > 256:
        raise ValueError(f"head dim {d}: the triton kernels take at most 256")
    return 64 if d <= 64 else (128 if d <= 128 else 256)


def family(prob) -> tuple[str, int]:
    """(dtype class, head-dim class) of a call: "32" where the dot runs in ieee fp32."""
    dtype = "32" if prob.shape.get("PREC") == "ieee" else "16"
    return dtype, head_dim_class(max(prob.block_d, prob.block_dv))


def config_list(kind: str, dtype_class: str, d: int) -> list[tuple[int, int, int, int]]:
    """The (BLOCK_M, BLOCK_N, warps, stages) list of launch kind `kind` for a dtype class and a
    (padded) head dim."""
    return CONFIGS[(kind, dtype_class, head_dim_class(d))]


def pairs(kind: str, prob) -> list[tuple[int, int, int, int]]:
    """The list kernel `kind` is tuned over for `prob`."""
    dtype, d = family(prob)
    return config_list(kind, dtype, d)


def _configs(pairs_):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in pairs_]


# The smallest tile side of any config: lengths up to it tune alike.
LENGTH_BUCKET_FLOOR = min(min(bm, bn) for cfgs in CONFIGS.values() for bm, bn, _, _ in cfgs)
# Keys inside one length bucket (the autotuner adds the tensors' dtypes); a kernel without one
# of these arguments ignores it.
_KEY = ["BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "HAS_BIAS", "HAS_MASK", "HAS_DROPOUT", "DELTA_PASS"]
_TUNED: dict = {}


def length_bucket(n: int) -> int:
    """The tuning bucket of a sequence length: the next power of two, at least the floor."""
    return max(LENGTH_BUCKET_FLOOR, triton.next_power_of_2(n))


def tuner(kernel, kind: str, prob):
    """The autotuned wrapper of `kernel` (of `kind`) for the family and length buckets of `prob`."""
    key = (getattr(kernel, "fn", kernel).__name__, kind, *family(prob),
           length_bucket(prob.shape["Lq"]), length_bucket(prob.shape["Lk"]))
    if key not in _TUNED:
        _TUNED[key] = triton.autotune(configs=_configs(pairs(kind, prob)), key=_KEY)(kernel)
    return _TUNED[key]


def launch(kernel, grid_fn, kind: str, prob, *args, **kwargs):
    """Run `kernel` on `args` and `kwargs` (all but BLOCK_M and BLOCK_N).

    grid_fn(BLOCK_M, BLOCK_N) -> grid. Autotuned on CUDA over the list of `kind` for the family
    of `prob`, once per length bucket (module docstring); fixed blocks under the interpreter.
    """
    if interpreting():
        bm, bn = INTERPRET_BLOCKS
        kernel[grid_fn(bm, bn)](*args, **kwargs, BLOCK_M=bm, BLOCK_N=bn)
        return
    tuner(kernel, kind, prob)[lambda meta: grid_fn(meta["BLOCK_M"], meta["BLOCK_N"])](
        *args, **kwargs)
