"""A quick timing of the model's own layer, LM head and optimizer step, which a plan scales to
the whole step: everything but attention's matmuls costs the same per token at any length, and
a decode step's cost grows linearly with the cache.

Only layers up to MAX_LAYER_PARAMS parameters are timed (a bigger one would not be quick);
plans for bigger models use the matmul and bandwidth rates instead (qkv.plan.calibrate).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from qkv.attention.flops import attention_flops
from qkv.plan.calibrate import clock

LAYER_FLOPS = 6e9  # the most matmul FLOPs one timed call may take
MAX_LAYER_PARAMS = 50_000_000
DECODE_CACHE = 4096  # the longest cache a decode step is timed against


@dataclass(frozen=True)
class LayerTiming:
    """Seconds per token of one layer without attention's matmuls, of the LM head (and loss in
    training), per parameter of the optimizer step, and per backend the (a, b) of one layer's
    decode step, a + b * n seconds against a cache of n tokens."""

    token_seconds: float
    head_token_seconds: float
    param_seconds: float
    decode: dict = field(hash=False, default_factory=dict)


def _median_seconds(fn, reps: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def _make_layer(spec, dtype, device):
    from qkv.nn import DecoderLayer, EncoderLayer

    with torch.device(device):
        layer = (DecoderLayer if spec.kind == "decoder" else EncoderLayer)(spec.config)
    return layer.to(dtype)


def _layer_step(spec, n, batch, train, dtype, device, backend, attention_rate) -> float:
    """Seconds per token of one layer's forward (and backward), less attention's matmuls."""
    layer = _make_layer(spec, dtype, device)
    params = sum(p.numel() for p in layer.parameters())
    passes = 3 if train else 1
    rows = max(16, min(n, 2048, int(LAYER_FLOPS / (2 * params * passes))))
    b = max(1, min(batch, int(LAYER_FLOPS / (2 * params * passes * rows))))
    x = torch.randn(b, rows, spec.config.d_model, device=device, dtype=dtype,
                    requires_grad=train)
    causal = spec.kind == "decoder"

    def step():
        with torch.enable_grad() if train else torch.no_grad():
            out = layer(x, backend=backend)
            if train:
                out.sum().backward()

    seconds = _median_seconds(step)
    a = spec.config.attention()
    attention = attention_flops(b, a.n_heads, rows, rows, a.head_dim, causal=causal,
                                mode="fwd_bwd" if train else "fwd") / attention_rate
    return max(seconds - attention, 0.0) / (b * rows)


def _head_step(spec, train, dtype, device) -> float:
    """Seconds per token of the LM head (with the loss and its backward in training)."""
    if spec.kind != "decoder":
        return 0.0
    d, vocab = spec.config.d_model, spec.config.vocab_size
    with torch.device(device):
        head = torch.nn.Linear(d, vocab, bias=False).to(dtype)
    rows = max(8, min(2048, int(LAYER_FLOPS / (2 * d * vocab * (3 if train else 1)))))
    x = torch.randn(rows, d, device=device, dtype=dtype, requires_grad=train)
    y = torch.randint(vocab, (rows,), device=device)

    def step():
        with torch.enable_grad() if train else torch.no_grad():
            logits = head(x)
            if train:
                F.cross_entropy(logits.float(), y).backward()

    return _median_seconds(step) / rows


def _optimizer_step(spec, device) -> float:
    """Seconds per parameter of an AdamW step, with clipping and zeroing, over one layer."""
    layer = _make_layer(spec, torch.float32, device)
    for p in layer.parameters():
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-4)

    def step():
        torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)
        opt.step()

    return _median_seconds(step) / sum(p.numel() for p in layer.parameters())


def _decode_step(spec, n, batch, dtype, device, backend) -> tuple[float, float]:
    """(a, b): one layer's decode step takes a + b * m seconds against a cache of m tokens,
    fitted from steps against one token and min(n, DECODE_CACHE) tokens."""
    from qkv.nn import DynamicCache

    layer = _make_layer(spec, dtype, device)
    a = spec.config.attention()
    lengths = sorted({1, max(1, min(n, DECODE_CACHE))})
    seconds = []
    for m in lengths:
        cache = DynamicCache()
        cache.step(None, batch, m, device)
        shape = (batch, a.n_kv_heads, m, a.head_dim)
        cache.update(0, torch.randn(shape, device=device, dtype=dtype),
                     torch.randn(shape, device=device, dtype=dtype))
        x = torch.randn(batch, 1, spec.config.d_model, device=device, dtype=dtype)

        def step(cache=cache, x=x):
            positions, _ = cache.step(None, batch, 1, device)
            with torch.no_grad():
                layer(x, positions=positions, cache=cache, backend=backend)

        seconds.append(_median_seconds(step, reps=5))
    if len(lengths) == 1:
        return seconds[0], 0.0
    slope = max((seconds[1] - seconds[0]) / (lengths[1] - lengths[0]), 0.0)
    return max(seconds[1] - slope * lengths[1], 0.0), slope


def time_layer(spec, n: int, batch: int, mode: str, dtype: torch.dtype, device, backends,
               attention_rates: dict) -> LayerTiming | None:
    """Time the spec's layer, head and optimizer here (a second or two), or None when a layer
    has more than MAX_LAYER_PARAMS parameters. `attention_rates` ({backend: {mode: FLOP/s}})
    take attention's matmuls out of the layer's time."""
    layer = _make_layer(spec, dtype, "meta")
    if sum(p.numel() for p in layer.parameters()) > MAX_LAYER_PARAMS:
        return None
    device = torch.device(device)
    train = mode == "train"
    if mode == "decode":
        decode = {b: _decode_step(spec, n, batch, dtype, device, b) for b in backends}
        return LayerTiming(0.0, _head_step(spec, False, dtype, device), 0.0, decode)
    backend = backends[0]
    rate = attention_rates[backend]["fwd_bwd" if train else "fwd"]
    return LayerTiming(_layer_step(spec, n, batch, train, dtype, device, backend, rate),
                       _head_step(spec, train, dtype, device),
                       _optimizer_step(spec, device) if train else 0.0)
