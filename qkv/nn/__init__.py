"""`qkv.nn`: modules that own parameters, all built on `qkv.attention`."""

from qkv.nn.attention import AttentionConfig, MultiHeadAttention
from qkv.nn.layers import FeedForward, FeedForwardConfig, LayerNorm, RMSNorm, make_norm
from qkv.nn.models import (
    Decoder,
    DecoderLM,
    Embeddings,
    Encoder,
    EncoderDecoder,
    EncoderDecoderConfig,
)
from qkv.nn.positions import (
    LearnedPositions,
    RotaryEmbedding,
    SinusoidalPositions,
    alibi_slopes,
    positions_from_mask,
    sinusoidal_table,
)
from qkv.nn.transformer import DecoderLayer, EncoderLayer, TransformerConfig

__all__ = [
    "AttentionConfig",
    "Decoder",
    "DecoderLM",
    "DecoderLayer",
    "Embeddings",
    "Encoder",
    "EncoderDecoder",
    "EncoderDecoderConfig",
    "EncoderLayer",
    "FeedForward",
    "FeedForwardConfig",
    "LayerNorm",
    "LearnedPositions",
    "MultiHeadAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "SinusoidalPositions",
    "TransformerConfig",
    "alibi_slopes",
    "make_norm",
    "positions_from_mask",
    "sinusoidal_table",
]
