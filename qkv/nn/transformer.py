"""The Transformer stack's settings and its two layer types."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from qkv.nn.attention import AttentionConfig, MultiHeadAttention
from qkv.nn.config import check_choice, check_float, check_int, from_dict
from qkv.nn.layers import ACTIVATIONS, NORMS, FeedForward, FeedForwardConfig, make_norm
from qkv.nn.positions import ROPE_SCALINGS

POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")
NORM_PLACEMENTS = ("pre", "post")


@dataclass
class TransformerConfig:
    """Every setting of an encoder, decoder or decoder-only LM.

    Examples: BERT / MiniLM is positions="learned", n_token_types=2, embed_norm=True,
    norm_placement="post", activation="gelu", norm_eps=1e-12. GPT-2 is positions="learned",
    norm_placement="pre", activation="gelu_tanh", tie_embeddings=True.
    """

    vocab_size: int
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: n_heads; fewer for GQA/MQA
    d_ff: int | None = None  # None: 4 * d_model
    max_len: int = 1024  # size of the learned / sinusoidal position table
    positions: str = "learned"  # learned | sinusoidal | rope | alibi | none
    rope_base: float = 10000.0
    rope_scaling: str | None = None  # None | linear | ntk
    rope_factor: float = 1.0
    activation: str = "gelu"  # relu | gelu | gelu_tanh | swiglu
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_placement: str = "pre"  # pre: x + f(norm(x)); post: norm(x + f(x)) as in the paper
    embed_norm: bool = False  # a norm right after the embeddings (BERT)
    final_norm: bool | None = None  # a norm after the last layer; None: True iff pre
    n_token_types: int = 0  # > 0 adds token type (segment) embeddings (BERT)
    bias: bool = True
    dropout: float = 0.0  # on embeddings and on each sublayer's output
    attn_dropout: float = 0.0  # on the attention weights
    # Sliding window (self-attention only): window=(window, 0) in the causal decoder, so a
    # query sees the `window` keys before it and itself; (window, window) in the encoder.
    window: int | None = None
    softcap: float | None = None
    tie_embeddings: bool = True  # DecoderLM / EncoderDecoder: lm_head shares tok_emb's weight
    backend: str = "auto"  # qkv.attention backend

    def __post_init__(self):
        check_int("vocab_size", self.vocab_size)
        check_int("d_model", self.d_model)
        check_int("n_layers", self.n_layers, minimum=0)
        check_int("n_heads", self.n_heads)
        check_int("d_ff", self.d_ff, optional=True)
        check_int("max_len", self.max_len)
        check_choice("positions", self.positions, POSITIONS)
        check_choice("rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("norm", self.norm, NORMS)
        check_float("norm_eps", self.norm_eps, low=0.0, low_open=True)
        check_choice("norm_placement", self.norm_placement, NORM_PLACEMENTS)
        check_choice("embed_norm", self.embed_norm, (True, False))
        check_choice("final_norm", self.final_norm, (None, True, False))
        check_int("n_token_types", self.n_token_types, minimum=0)
        check_choice("bias", self.bias, (True, False))
        check_float("dropout", self.dropout, low=0.0, high=1.0)
        check_choice("tie_embeddings", self.tie_embeddings, (True, False))
        self.attention()  # validates the attention settings (heads, window, rope, ...)

    @classmethod
    def from_dict(cls, values: dict) -> TransformerConfig:
        """Build from a dict, raising ValueError on unknown keys."""
        return from_dict(cls, values)

    @property
    def has_final_norm(self) -> bool:
        return self.norm_placement == "pre" if self.final_norm is None else self.final_norm

    def attention(self, cross: bool = False) -> AttentionConfig:
        """The AttentionConfig of a self- (or cross-) attention sublayer."""
        positions = self.positions if self.positions in ("rope", "alibi") and not cross else "none"
        return AttentionConfig(
            d_model=self.d_model, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
            bias=self.bias, attn_dropout=self.attn_dropout, dropout=self.dropout, cross=cross,
            positions=positions, rope_base=self.rope_base, rope_scaling=self.rope_scaling,
            rope_factor=self.rope_factor, window=None if cross else self.window,
            softcap=self.softcap, backend=self.backend,
        )

    def feed_forward(self) -> FeedForwardConfig:
        """The FeedForwardConfig of each layer."""
        return FeedForwardConfig(
            d_model=self.d_model, d_ff=self.d_ff or 4 * self.d_model,
            activation=self.activation, bias=self.bias, dropout=self.dropout,
        )

    def make_norm(self) -> nn.Module:
        return make_norm(self.norm, self.d_model, self.norm_eps, self.bias)


class _Sublayers(nn.Module):
    """Residual wiring shared by both layer types: pre-LN or post-LN."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.pre = config.norm_placement == "pre"

    def residual(self, x: torch.Tensor, norm: nn.Module, fn) -> torch.Tensor:
        if self.pre:
            return x + fn(norm(x))
        return norm(x + fn(x))


class EncoderLayer(_Sublayers):
    """Bidirectional self-attention, then feed-forward, each with a residual and a norm."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        self.attn = MultiHeadAttention(config.attention())
        self.attn_norm = config.make_norm()
        self.ffn = FeedForward(config.feed_forward())
        self.ffn_norm = config.make_norm()

    def forward(self, x, *, positions=None, kv_lengths=None, key_padding_mask=None, backend=None,
                cu_seqlens=None):
        """x (B, L, d_model) -> (B, L, d_model); padding as kv_lengths (B,) or mask (B, L).
        Packed rows: x (T, d_model) with cu_seqlens (B+1,) (see MultiHeadAttention)."""
        x = self.residual(x, self.attn_norm, lambda h: self.attn(
            h, positions=positions, kv_lengths=kv_lengths, key_padding_mask=key_padding_mask,
            backend=backend, cu_seqlens=cu_seqlens,
        ))
        return self.residual(x, self.ffn_norm, self.ffn)


class DecoderLayer(_Sublayers):
    """Causal self-attention, optional cross-attention to a memory, then feed-forward."""

    def __init__(self, config: TransformerConfig, cross: bool = False):
        super().__init__(config)
        self.attn = MultiHeadAttention(config.attention())
        self.attn_norm = config.make_norm()
        self.cross_attn = MultiHeadAttention(config.attention(cross=True)) if cross else None
        self.cross_norm = config.make_norm() if cross else None
        self.ffn = FeedForward(config.feed_forward())
        self.ffn_norm = config.make_norm()

    def forward(self, x, memory=None, *, positions=None, kv_lengths=None, key_padding_mask=None,
                memory_lengths=None, memory_mask=None, cache=None, cross_cache=None,
                layer_idx=0, backend=None, cu_seqlens=None, memory_cu_seqlens=None):
        """x (B, L, d_model), memory (B, Lm, d_model) -> (B, L, d_model).

        kv_lengths / key_padding_mask describe the self-attention keys (with a cache: every key
        the cache returns); memory_lengths (B,) / memory_mask (B, Lm) the memory's padding.
        Packed rows: x (T, d_model) with cu_seqlens, memory (Tm, d_model) with memory_cu_seqlens;
        sequence b is causal within itself and cross-attends to memory sequence b.
        """
        x = self.residual(x, self.attn_norm, lambda h: self.attn(
            h, causal=True, positions=positions, kv_lengths=kv_lengths,
            key_padding_mask=key_padding_mask, cache=cache, layer_idx=layer_idx, backend=backend,
            cu_seqlens=cu_seqlens,
        ))
        if self.cross_attn is not None:
            x = self.residual(x, self.cross_norm, lambda h: self.cross_attn(
                h, memory, kv_lengths=memory_lengths, key_padding_mask=memory_mask,
                cache=cross_cache, layer_idx=layer_idx, backend=backend, cu_seqlens=cu_seqlens,
                context_cu_seqlens=memory_cu_seqlens,
            ))
        return self.residual(x, self.ffn_norm, self.ffn)
