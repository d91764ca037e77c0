"""Compile the triton kernels for a named GPU without a GPU, and read what ptxas made of them.

`triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32))`
lowers a kernel to PTX and runs the wheel's `ptxas -v` on it; no driver is needed. A `Case`
names one (kernel, feature set, config, head dim, dtype); `compile_case` compiles it for one
target and returns a `Result`: registers per thread, spill bytes (stores + loads), shared
memory (bytes), or the error that stopped the compile.

The cases follow the launches of `function.py`, `kernels_bwd.backward` and
`kernels_decode.decode_forward`: the forward, dK/dV and dQ kernels (and the dQ kernel's delta
pass) over exactly the configs autotuning may choose at each dtype and head dim
(`launch.CONFIGS`, by dtype class and head-dim class), the delta preprocess and decode merge with
their fixed sizes, and decode split with its fixed warps and stages.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qkv.attention.triton import kernels_bwd, kernels_decode, kernels_fwd, launch

TARGETS = (90, 80)
# Shared memory one block may use (bytes): H100/H200 227 KB, A100 163 KB. A config over it
# compiles, but its launch fails (the autotuner then skips it).
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
HEAD_DIMS = (64, 128, 256)
DTYPES = ("fp16", "bf16", "fp32")

# Feature sets: the constexpr flags each turns on (all others off). GQA changes only the
# runtime group count G, except in decode split, where it stacks the group's queries as rows.
FEATURES = {
    "plain": {},
    "causal": {"IS_CAUSAL": True},
    "window": {"HAS_WL": True, "HAS_WR": True},
    "alibi+softcap+gqa": {"HAS_ALIBI": True, "HAS_SOFTCAP": True},
    "bias+mask": {"HAS_BIAS": True, "HAS_MASK": True},
    "kv_lengths": {"HAS_KVLEN": True, "HAS_QOFF": True, "IS_CAUSAL": True},
    "dropout": {"HAS_DROPOUT": True},
    "varlen": {"IS_VARLEN": True},
}
# Decode split never sees these (`function.use_decode`).
DECODE_EXCLUDED = ("bias+mask", "dropout", "varlen")
# Decode split's BLOCK_M = pow2(G·Lq): one query of one head, or the largest stack (DECODE_MAX_ROWS).
DECODE_ROWS = {"alibi+softcap+gqa": 64}

KERNELS = ("fwd", "bwd_preprocess", "bwd_dq_delta", "bwd_dkdv", "bwd_dq", "decode_split",
           "decode_merge")
_FLAGS = ("IS_CAUSAL", "HAS_WL", "HAS_WR", "HAS_KVLEN", "HAS_QOFF", "IS_VARLEN", "HAS_BIAS",
          "HAS_MASK", "HAS_ALIBI", "HAS_SOFTCAP", "HAS_DROPOUT", "HAS_DLSE", "STORE_DBIAS",
          "DELTA_PASS")
# Pointer arguments: element type ("data" = the q/k/v dtype) and the flag that makes them present.
_POINTERS = {
    "Q": ("data", None), "K": ("data", None), "V": ("data", None), "O": ("data", None),
    "DO": ("data", None), "DQ": ("data", None), "DK": ("data", None), "DV": ("data", None),
    "M": ("fp32", None), "L2": ("fp32", None), "DELTA": ("fp32", None),
    "OP": ("fp32", None), "MP": ("fp32", None), "LP": ("fp32", None),
    "DLSE": ("fp32", "HAS_DLSE"), "DBIAS": ("fp32", "STORE_DBIAS"),
    "CU_Q": ("i32", "IS_VARLEN"), "CU_K": ("i32", "IS_VARLEN"),
    "KVLEN": ("i32", "HAS_KVLEN"), "QOFF": ("i32", "HAS_QOFF"),
    "BIAS": ("data", "HAS_BIAS"), "MASK": ("u8", "HAS_MASK"), "SLOPES": ("fp32", "HAS_ALIBI"),
}
_FLOATS = ("sm_scale", "softcap", "drop_scale", "large_m2")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


@dataclass(frozen=True)
class Case:
    """One compile: kernel, feature set, head dim, dtype and launch config."""

    kernel: str
    features: str
    head_dim: int
    dtype: str
    block_m: int
    block_n: int  # 0 where the kernel has no key block (preprocess, merge)
    num_warps: int
    num_stages: int

    @property
    def config(self) -> str:
        tile = f"{self.block_m}x{self.block_n}" if self.block_n else f"{self.block_m}"
        return f"{tile} w{self.num_warps} s{self.num_stages}"


@dataclass
class Result:
    """What one compile of `case` for sm_`arch` gave (`error` set when it failed)."""

    case: Case
    arch: int
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    seconds: float = 0.0
    error: str | None = None

    def as_dict(self) -> dict:
        """Flat, JSON-ready fields of the case and its result."""
        return {**asdict(self.case), "config": self.case.config, "arch": self.arch,
                "compiled": self.compiled, "fits": self.fits, "regs": self.regs, "spill": self.spill,
                "spill_stores": self.spill_stores, "spill_loads": self.spill_loads,
                "shared": self.shared, "seconds": round(self.seconds, 2), "error": self.error}

    @property
    def compiled(self) -> bool:
        return self.error is None

    @property
    def fits(self) -> bool:
        """Compiled, and its shared memory fits one block of the target."""
        return self.compiled and self.shared <= SHARED_LIMIT[self.arch]

    @property
    def spill(self) -> int | None:
        if self.spill_stores is None:
            return None
        return self.spill_stores + self.spill_loads


def ptxas_available() -> bool:
    """True when the triton wheel's ptxas is there (the compile check needs nothing else)."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return os.path.exists(get_ptxas(GPUTarget("cuda", 90, 32).arch).path)
    except (RuntimeError, OSError, AttributeError):
        return False


# The launch kind (launch.CONFIGS) of each autotuned kernel.
KIND = {"fwd": "fwd", "bwd_dkdv": "dkdv", "bwd_dq": "dq", "bwd_dq_delta": "dq_delta"}


def tuned_configs(kernel: str, dtype: str, d: int) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, warps, stages) of the configs autotuning may choose for `kernel` at
    `dtype` and head dim d: exactly the list launch.py hands the autotuner."""
    return list(launch.config_list(KIND[kernel], "32" if dtype == "fp32" else "16", d))


def _fixed_configs(kernel: str, features: str, d: int,
                   dtype: str) -> list[tuple[int, int, int, int]]:
    """The fixed sizes of the kernels launched without autotuning (see the module docstring)."""
    if kernel == "bwd_preprocess":
        return [(64, 0, 4, 3)]  # triton's defaults: 4 warps, 3 stages
    if kernel == "decode_merge":
        return [(32, 0, 4, 3)]  # BLOCK_S = pow2(splits), 32 splits here
    return [(DECODE_ROWS.get(features, 16), *kernels_decode.split_config(dtype == "fp32", d))]


def cases(kernels=KERNELS, features=tuple(FEATURES), head_dims=HEAD_DIMS, dtypes=DTYPES,
          configs: str = "all") -> list[Case]:
    """Every case of the given axes; configs="first" keeps only the first config of each list."""
    out = []
    for kernel in kernels:
        feats = features
        if kernel in ("bwd_preprocess", "decode_merge"):
            feats = ("plain",)  # no feature flags
        elif kernel == "decode_split":
            feats = tuple(f for f in features if f not in DECODE_EXCLUDED)
        for feat in feats:
            for d in head_dims:
                for dtype in dtypes:
                    if kernel in KIND:
                        cfgs = tuned_configs(kernel, dtype, d)
                    else:
                        cfgs = _fixed_configs(kernel, feat, d, dtype)
                    if configs == "first":
                        cfgs = cfgs[:1]
                    out.extend(Case(kernel, feat, d, dtype, *c) for c in cfgs)
    return out


def quick_cases() -> list[Case]:
    """One case per kernel: the first config, no features, D = 64, fp16."""
    return cases(features=("plain",), head_dims=(64,), dtypes=("fp16",), configs="first")


# Feature sets that use the most registers: the full check takes them before the others.
_HEAVY = ("alibi+softcap+gqa", "bias+mask", "dropout", "kv_lengths")


def priority(case: Case, arch: int) -> tuple:
    """Sort key of the full check, most telling first: fp16 at D <= 128 (the no-spill target)
    with the heaviest feature sets, then its other sets; fp16 at D = 256; fp32 (the heavy sets
    first); bf16 last (it compiles like fp16). sm_90 before sm_80 within each."""
    heavy = case.features in _HEAVY
    if case.dtype == "fp16":
        stage = (0 if heavy else 1) if case.head_dim <= 128 else 2
    elif case.dtype == "fp32":
        stage = 3 if heavy else 4
    else:
        stage = 5
    return (stage, arch != 90)


def _kernel_fn(kernel: str):
    return {
        "fwd": kernels_fwd._attn_fwd, "bwd_preprocess": kernels_bwd._bwd_preprocess,
        "bwd_dq_delta": kernels_bwd._attn_bwd_dq, "bwd_dkdv": kernels_bwd._attn_bwd_dkdv,
        "bwd_dq": kernels_bwd._attn_bwd_dq, "decode_split": kernels_decode._attn_decode_split,
        "decode_merge": kernels_decode._attn_decode_merge,
    }[kernel]


def _constexprs(case: Case) -> dict:
    """Values of the kernel's constexpr parameters for `case`."""
    flags = dict.fromkeys(_FLAGS, False)
    flags.update(FEATURES[case.features])
    if case.kernel in ("bwd_dq", "bwd_dq_delta"):
        flags["DELTA_PASS"] = case.kernel == "bwd_dq_delta"
        flags["STORE_DBIAS"] = flags["HAS_BIAS"] and case.kernel == "bwd_dq"
    return {
        **flags, "BLOCK_M": case.block_m, "BLOCK_N": case.block_n, "BLOCK_D": case.head_dim,
        "BLOCK_DV": case.head_dim, "BLOCK_S": case.block_m,
        "PREC": "ieee" if case.dtype == "fp32" else "tf32",
    }


def source(case: Case) -> ASTSource:
    """The ASTSource of `case`: pointers 16-byte aligned, absent ones None, integers as
    `launch_ints` specializes them."""
    fn = _kernel_fn(case.kernel)
    values, ints = _constexprs(case), launch_ints(case)
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = values[name]
        elif name in _POINTERS:
            elem, flag = _POINTERS[name]
            if flag is not None and not values[flag]:
                signature[name] = "constexpr"
                constexprs[name] = None
                continue
            signature[name] = "*" + (case.dtype if elem == "data" else elem)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOATS:
            signature[name] = "fp32"
        else:  # triton's own rule at launch: 1 is a constant, multiples of 16 are marked so
            value = ints.get(name, 16 if name.startswith("stride_") else 0)
            if value == 1:
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs, attrs)


def launch_ints(case: Case) -> dict:
    """Integer arguments of a representative launch of `case`, which triton specializes on
    (1 a constant, multiples of 16 marked divisible): B = 2, Hq = 8, Lq = Lk = 1024, contiguous
    tensors (every stride a multiple of 16), G = 4 with GQA and 1 without; decode: one query
    (16 stacked with GQA: 64 rows) over 8192 keys in 32 splits. Absent features pass 0."""
    flags = FEATURES[case.features]
    gqa = case.features == "alibi+softcap+gqa"
    decode = case.kernel.startswith("decode")
    ints = {"Hq": 8, "G": 4 if gqa else 1, "Lq": 1024, "Lk": 1024, "head_dim": case.head_dim,
            "head_dim_v": case.head_dim, "n_rows": 2 * 8 * 1024, "n_splits": 32, "chunk": 256,
            "wl": 100 if flags.get("HAS_WL") else 0, "wr": 100 if flags.get("HAS_WR") else 0,
            "drop_thresh": 1677722 if flags.get("HAS_DROPOUT") else 0,
            "seed": 1234 if flags.get("HAS_DROPOUT") else 0}
    if decode:
        ints.update(Lq=16 if gqa else 1, Lk=8192)
    return ints


def compile_case(case: Case, arch: int) -> Result:
    """Compile `case` for sm_`arch` and read registers, spills and shared memory."""
    from triton import knobs

    if launch.interpreting():
        raise RuntimeError("the compile check needs real kernels: unset TRITON_INTERPRET")
    result = Result(case, arch)
    start = time.perf_counter()
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as cache, contextlib.ExitStack() as stack:
        stack.enter_context(knobs.cache.scope())
        stack.enter_context(knobs.nvidia.scope())
        knobs.cache.dir = cache  # a fresh cache: ptxas runs, and its log is read, every time
        knobs.nvidia.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(
                    source(case), target=GPUTarget("cuda", arch, 32),
                    options={"num_warps": case.num_warps, "num_stages": case.num_stages})
        except Exception as e:  # noqa: BLE001 - any compiler failure is a result to report
            lines = str(e).strip().splitlines() or [""]
            result.error = f"{type(e).__name__}: {lines[0][:200]}"
            result.seconds = time.perf_counter() - start
            return result
    text = log.getvalue()
    regs, spill = _REGS.search(text), _SPILL.search(text)
    result.regs = int(regs.group(1)) if regs else None
    if spill:
        result.spill_stores, result.spill_loads = int(spill.group(1)), int(spill.group(2))
    result.shared = int(compiled.metadata.shared)
    result.seconds = time.perf_counter() - start
    return result


def compile_many(todo: list[tuple[Case, int]], workers: int = 1, max_seconds: float | None = None):
    """Yield the Result of each (case, arch) as it finishes, `workers` processes at a time, in
    the order of `todo`; after `max_seconds`, start no new compile (the running ones finish)."""
    deadline = None if max_seconds is None else time.perf_counter() + max_seconds
    if workers <= 1:
        for case, arch in todo:
            if deadline is not None and time.perf_counter() > deadline:
                return
            yield compile_case(case, arch)
        return
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending, queue = set(), list(reversed(todo))
        while queue or pending:
            while queue and len(pending) < workers and (
                    deadline is None or time.perf_counter() < deadline):
                pending.add(pool.submit(compile_case, *queue.pop()))
            if not pending:
                return
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                yield f.result()
