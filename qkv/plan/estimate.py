"""`make_plan`: parameters, FLOPs, peak memory, the longest sequence that fits and a time
estimate for one step of a model, per attention backend."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from qkv.attention.chunked import BLOCK_M, BLOCK_N
from qkv.nn.config import check_choice, check_int
from qkv.plan.calibrate import Rates
from qkv.plan.memory import (
    BACKENDS,
    DTYPES,
    MODES,
    Shapes,
    crossover,
    fits,
    memory,
    step_flops,
)
from qkv.plan.presets import ModelSpec, count_params

DEVICE_BACKENDS = {"cpu": ("sdpa", "chunked", "reference"),
                   "cuda": ("triton", "sdpa", "chunked", "reference")}
OPS_PER_LAYER = 40  # small tensor ops in one layer's forward (norms, projections, residuals)
ELEMENTWISE_PASSES = 12  # reads and writes of a token's d_model-wide activations per layer


@dataclass
class BackendPlan:
    """One backend's memory (bytes by component, with total), the largest n that fits the
    budget (None without a budget; 0 if not even n = 1), and seconds per step."""

    backend: str
    memory: dict[str, int]
    max_seq_len: int | None
    seconds: float
    fits: bool | None


@dataclass
class Plan:
    """What `qkv plan` reports; `to_dict` is its JSON."""

    model: str
    kind: str
    mode: str
    seq_len: int
    batch: int
    dtype: str
    device: str
    params: int
    flops: dict[str, float]  # per step: attention, linear, total
    flops_per_token: dict[str, float]
    attention_share: float
    crossover_seq_len: int
    budget: int | None
    budget_source: str | None
    backends: list[BackendPlan]
    suggestion: dict
    time_source: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def step_seconds(shapes: Shapes, params: int, n: int, batch: int, dtype: str, mode: str,
                 backend: str, rates: Rates, cache_bytes: int) -> float:
    """Seconds of one step: matmuls at rates.matmul, attention at the backend's rate, the
    element-wise passes, the optimizer's and the cache's bytes at rates.bandwidth, and the
    fixed cost of each small op."""
    s, e = shapes, DTYPES[dtype]
    flops = step_flops(s, n, batch, mode)
    attn_mode = "fwd_bwd" if mode == "train" else "fwd"
    tokens = batch * (1 if mode == "decode" else n)
    layer = rates.layer
    if layer is not None:  # the model's own layer, timed (qkv.plan.layer_timing)
        head_tokens = batch * (n if mode == "train" else 1)
        seconds = head_tokens * layer.head_token_seconds + params * layer.param_seconds
        if mode == "decode":
            a, b = layer.decode[backend]
            return seconds + s.layers * (a + b * n)
        seconds += s.layers * tokens * layer.token_seconds
        return seconds + flops["attention"] / rates.attention[backend][attn_mode]
    seconds = flops["linear"] / rates.matmul
    seconds += flops["attention"] / rates.attention[backend][attn_mode]
    passes = 3 if mode == "train" else 1
    width = ELEMENTWISE_PASSES * s.d + 4 * s.d_ff
    moved = passes * tokens * s.layers * width * e
    if s.lm_head and mode == "train":
        moved += 6 * tokens * s.vocab * 4  # log-softmax and its gradient
    if mode == "train":
        moved += 12 * params * 4  # AdamW, clipping and zeroing: about a dozen passes
    if mode == "decode":
        moved += params * e + 3 * cache_bytes  # read the weights; read and copy the cache
    seconds += moved / rates.bandwidth
    return seconds + passes * OPS_PER_LAYER * s.layers * rates.op_seconds


def make_plan(spec: ModelSpec, seq_len: int, batch: int = 1, dtype: str = "fp32",
              mode: str = "train", budget: int | None = None, budget_source: str | None = None,
              rates: Rates | None = None, device: str = "cpu") -> Plan:
    """The plan of one step of `spec` at `seq_len` tokens per row (see qkv.plan.memory for
    the modes). `budget` (bytes) sets which backends fit and the largest n each allows;
    `rates` (qkv.plan.calibrate) the time estimate (nominal rates, marked uncalibrated, if
    None). Raises ValueError naming the argument for a bad seq_len, batch, dtype or mode, or
    for decode on an encoder."""
    from qkv.plan.calibrate import nominal

    check_int("seq_len", seq_len)
    check_int("batch", batch)
    check_choice("dtype", dtype, tuple(DTYPES))
    check_choice("mode", mode, MODES)
    check_choice("device", device, tuple(DEVICE_BACKENDS))
    if mode == "decode" and spec.kind != "decoder":
        raise ValueError(f"mode 'decode' needs a decoder; {spec.name} is an {spec.kind}")
    rates = rates or nominal()
    s = Shapes.of(spec)
    params = count_params(spec)
    flops = step_flops(s, seq_len, batch, mode)
    flops["total"] = flops["linear"] + flops["attention"]
    tokens = batch * (1 if mode == "decode" else seq_len)
    per_token = {k: v / tokens for k, v in flops.items()}
    plans = []
    for backend in DEVICE_BACKENDS[device]:
        mem = memory(spec, s, params, seq_len, batch, dtype, mode, backend)
        largest = None
        if budget is not None:
            largest = fits(lambda n, b=backend: memory(spec, s, params, n, batch, dtype, mode,
                                                        b)["total"], budget)
        seconds = step_seconds(s, params, seq_len, batch, dtype, mode, backend, rates,
                               mem["kv_cache"])
        plans.append(BackendPlan(backend, mem, largest, seconds,
                                 None if budget is None else mem["total"] <= budget))
    notes = []
    positions = spec.config.positions
    if positions in ("learned", "sinusoidal") and seq_len > spec.config.max_len:
        notes.append(f"{spec.name}'s {positions} positions stop at {spec.config.max_len} "
                     f"tokens; seq_len {seq_len} needs a longer table")
    at_one = None
    if budget is not None and all(p.max_seq_len == 0 for p in plans):
        at_one = {p.backend: memory(spec, s, params, 1, batch, dtype, mode, p.backend)["total"]
                  for p in plans}
        least = min(at_one, key=at_one.get)
        notes.append(f"the budget ({budget:,} bytes) is too small for even n = 1: one step of "
                     f"{spec.name} needs at least {at_one[least]:,} bytes at n = 1 (with "
                     f"{least}, the least of every backend)")
    return Plan(spec.name, spec.kind, mode, seq_len, batch, dtype, device, params, flops,
                per_token, flops["attention"] / flops["total"], crossover(s, mode), budget,
                budget_source, plans, suggest(plans, batch, s.heads, at_one), rates.source,
                notes)


def suggest(plans: list[BackendPlan], batch: int, heads: int,
            at_one: dict[str, int] | None = None) -> dict:
    """The fastest backend that fits (every backend when there is no budget), else the one
    that allows the longest sequence, else (nothing fits even n = 1) the one that needs the
    least memory at n = 1 (`at_one`: bytes by backend); with its block size and why."""
    fitting = [p for p in plans if p.fits is not False]
    if fitting:
        best = min(fitting, key=lambda p: p.seconds)
        reason = "fastest estimate" + (" that fits the budget" if best.fits else "")
    elif all(p.max_seq_len == 0 for p in plans):
        need = at_one or {p.backend: p.memory["total"] for p in plans}
        best = min(plans, key=lambda p: (need[p.backend], p.seconds))
        reason = (f"nothing fits the budget, not even n = 1; {best.backend} needs the least "
                  f"memory: {need[best.backend]:,} bytes at {'n = 1' if at_one else 'this n'}")
    else:
        best = max(plans, key=lambda p: (p.max_seq_len or 0, -p.seconds))
        reason = (f"nothing fits the budget at this length; {best.backend} allows the longest "
                  f"sequence ({best.max_seq_len:,})")
    block = {"chunked": f"{BLOCK_M}x{BLOCK_N} (queries x keys, qkv.attention.chunked)",
             "triton": "autotuned per shape on the GPU",
             "sdpa": "torch's own", "reference": "none: the whole (n x n) matrix"}[best.backend]
    return {"backend": best.backend, "block": block, "reason": reason}


__all__ = ["BACKENDS", "BackendPlan", "Plan", "make_plan", "step_seconds", "suggest"]
