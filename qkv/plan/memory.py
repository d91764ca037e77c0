"""Peak memory and FLOPs of one step of a qkv Transformer, counted from what qkv keeps.

Modes (B rows of n tokens):
- train: one AdamW step (the trainer's: fp32 weights, gradients and two moments, the logits
  held through backward), loss on every position;
- prefill: one forward pass without gradients over the n-token prompt, last position's logits
  only (generation's first call; the KV cache it fills is counted in decode);
- decode: one new token per row against a KV cache holding n tokens (DynamicCache, what
  `qkv generate` uses).

Activations are counted per token per layer from the tensors autograd saves in qkv's modules
(train), or from the tensors alive at the busiest moment of a layer (prefill). The attention
term depends on the backend: `reference` keeps two fp32 (B, H, n, n) matrices per layer for
backward (the softmax output and the masked weights) and builds about four at once in a
forward; `chunked` keeps out and two row statistics and works in (256 x 512) blocks; `sdpa`
(torch's flash kernel) and `triton` keep out and the logsumexp.
"""

from __future__ import annotations

from dataclasses import dataclass

from qkv.attention.chunked import BLOCK_M, BLOCK_N
from qkv.attention.flops import attention_flops, kv_cache_bytes
from qkv.plan.presets import ModelSpec

MODES = ("train", "prefill", "decode")
BACKENDS = ("reference", "chunked", "sdpa", "triton")
DTYPES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_BYTES_PER_PARAM = 8  # two fp32 moments
FP32 = 4  # scores, softmax, logits for the loss, gradients and optimizer state stay fp32


@dataclass(frozen=True)
class Shapes:
    """The per-layer widths of a TransformerConfig that memory and FLOPs depend on."""

    d: int  # d_model
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    d_ff: int
    vocab: int
    activation: str
    rope: bool
    rmsnorm: bool
    causal: bool  # decoder: causal self-attention
    lm_head: bool

    @classmethod
    def of(cls, spec: ModelSpec) -> Shapes:
        c = spec.config
        a = c.attention()
        return cls(d=c.d_model, layers=c.n_layers, heads=a.n_heads, kv_heads=a.n_kv_heads,
                   head_dim=a.head_dim, d_ff=c.feed_forward().d_ff, vocab=c.vocab_size,
                   activation=c.activation, rope=c.positions == "rope",
                   rmsnorm=c.norm == "rmsnorm", causal=spec.kind == "decoder",
                   lm_head=spec.kind == "decoder")

    @property
    def qkv_width(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    @property
    def attn_width(self) -> int:
        return self.heads * self.head_dim

    def matmul_params_per_layer(self) -> int:
        """Weights multiplied per token in one layer: projections and feed-forward."""
        ffn = (3 if self.activation == "swiglu" else 2) * self.d * self.d_ff
        return self.d * self.qkv_width + self.attn_width * self.d + ffn


def _per_token_saved(s: Shapes, backend: str) -> int:
    """Elements autograd keeps per token per layer (besides the (n x n) matrices)."""
    ffn = {"relu": 1, "gelu": 2, "gelu_tanh": 2, "swiglu": 4}[s.activation] * s.d_ff
    norms = 2 * s.d + 2 if s.rmsnorm else 4  # RMSNorm keeps x / rms(x); LayerNorm mean, rstd
    rope = (s.heads + s.kv_heads) * s.head_dim + 2 * s.head_dim if s.rope else 0
    out = {"reference": 1, "chunked": 2, "sdpa": 1, "triton": 1}[backend] * s.attn_width
    stats = {"reference": 0, "chunked": 2, "sdpa": 1, "triton": 1}[backend] * s.heads
    # norm inputs and outputs (4d), the fused q|k|v projection, attention's out, the FFN
    return 4 * s.d + s.qkv_width + rope + out + stats + ffn + norms


def _per_token_busiest(s: Shapes) -> int:
    """Elements alive per token at the busiest moment of a layer's forward without grad."""
    rope = 2 * (s.heads + s.kv_heads) * s.head_dim if s.rope else 0
    attention = 2 * s.d + s.qkv_width + rope + 2 * s.attn_width
    ffn = 2 * s.d + (3 if s.activation == "swiglu" else 2) * s.d_ff
    return max(attention, ffn)


def attention_bytes(s: Shapes, n: int, batch: int, mode: str, backend: str) -> tuple[int, int]:
    """(kept, working): bytes the attention computation keeps for backward over all layers
    (the (B, H, n, n) matrices of `reference`), and its working memory at its busiest, beyond
    its inputs and output (reference's matrices in flight, chunked's blocks, the gradients of
    q, k and v in training)."""
    if mode == "decode":  # one query row: the scores of one row per head
        rows = 4 if backend == "reference" else 1
        return 0, rows * batch * s.heads * n * FP32
    square = batch * s.heads * n * n * FP32
    train = mode == "train"
    if backend == "reference":
        mask = n * n if s.causal else 0  # the causal mask, one byte per pair
        kept = (2 * square + mask) * s.layers if train else 0
        return kept, (3 if train else 4) * square + mask
    grads = batch * n * s.qkv_width * FP32 if train else 0  # dq, dk, dv
    if backend == "chunked":
        block = batch * s.heads * min(n, BLOCK_M) * min(n, BLOCK_N) * FP32
        return 0, 3 * block + grads
    return 0, grads


def memory(spec: ModelSpec, shapes: Shapes, params: int, n: int, batch: int, dtype: str,
           mode: str, backend: str) -> dict[str, int]:
    """Peak bytes of one step, by component, and their peak `total`.

    Components: weights, gradients, optimizer (AdamW's moments), activations (what the layers
    and the LM head keep, and the head's backward), kv_cache, attention (the backend's kept
    matrices and working memory). In training the gradients fill as backward frees the
    activations, and the head's backward is over before any layer's attention backward starts,
    so total = weights + optimizer + max(activations + attention - overlap, gradients).
    """
    s, e = shapes, DTYPES[dtype]
    tokens = batch * n
    kept, working = attention_bytes(s, n, batch, mode, backend)
    out = {"weights": params * (FP32 if mode == "train" else e), "gradients": 0,
           "optimizer": 0, "activations": 0, "kv_cache": 0, "attention": kept + working}
    if mode == "train":
        out["gradients"] = params * FP32
        out["optimizer"] = params * ADAM_BYTES_PER_PARAM
        saved = tokens * (s.layers * _per_token_saved(s, backend) + 3 * s.d) * e
        head = tokens * s.vocab * 2 * FP32 if s.lm_head else 0  # logits, log-softmax
        head_backward = head  # their two gradients, at the start of backward
        out["activations"] = saved + head + head_backward
        busy = out["activations"] + out["attention"] - min(head_backward, working)
        out["total"] = out["weights"] + out["optimizer"] + max(busy, out["gradients"])
        return out
    if mode == "prefill":
        logits = batch * s.vocab * FP32 if s.lm_head else 0
        out["activations"] = tokens * (s.d + _per_token_busiest(s)) * e + logits
    else:
        cache = kv_cache_bytes(batch, s.kv_heads, n, s.head_dim, e) * s.layers
        out["kv_cache"] = cache
        step = batch * (_per_token_busiest(s) + s.d) * e + batch * s.vocab * FP32
        # a layer whose buffer moves to one an eighth larger keeps the old one alive meanwhile
        out["activations"] = step + cache // max(s.layers, 1)
    out["total"] = sum(out.values())
    return out


def fits(total_at, budget: int, limit: int = 1 << 40) -> int:
    """The largest n >= 1 with total_at(n) <= budget (0 if not even n = 1); total_at must grow
    with n. Exponential search, then bisection: exact for any such function."""
    if total_at(1) > budget:
        return 0
    lo, hi = 1, 2
    while hi <= limit and total_at(hi) <= budget:
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total_at(mid) <= budget else (lo, mid)
    return lo


def step_flops(s: Shapes, n: int, batch: int, mode: str) -> dict[str, float]:
    """Matmul FLOPs of one step: `attention` (scores and weights times values) and `linear`
    (projections, feed-forward and the LM head), counting backward as FlashAttention does
    (attention 2.5x forward, other matmuls 2x)."""
    q_len = 1 if mode == "decode" else n
    head_rows = batch * (n if mode == "train" else 1)
    linear = 2.0 * (batch * q_len * s.layers * s.matmul_params_per_layer()
                    + (head_rows * s.d * s.vocab if s.lm_head else 0))
    attn_mode = "fwd_bwd" if mode == "train" else "fwd"
    attention = s.layers * attention_flops(batch, s.heads, q_len, n, s.head_dim,
                                           causal=s.causal and q_len == n, mode=attn_mode)
    return {"linear": linear * (3.0 if mode == "train" else 1.0), "attention": attention}


def crossover(s: Shapes, mode: str) -> int:
    """The smallest n at which attention's share of step_flops passes half (attention's FLOPs
    exceed everything else's), so it agrees with the share a plan prints at any n.

    Attention grows as n² (n for decode), the rest as n plus a constant (the LM head, on the
    last position only in prefill), so their difference is convex in n and changes sign once
    for n >= 1: one past the largest n where attention has not passed (`fits`' search).
    """
    def passes(n: int) -> int:
        flops = step_flops(s, n, 1, mode)
        return int(flops["attention"] > flops["linear"])

    return fits(passes, 0) + 1
