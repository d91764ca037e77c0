"""`qkv.nn`: modules that own parameters, all built on `qkv.attention`."""

from qkv.nn.attention import AttentionConfig, MultiHeadAttention
from qkv.nn.baselines import (
    LSTMLM,
    MODEL_KINDS,
    TCNLM,
    LSTMConfig,
    TCNBlock,
    TCNConfig,
    matched_models,
    parameter_counts,
    token_embedding,
)
from qkv.nn.cache import (
    CrossAttentionCache,
    DynamicCache,
    KVCache,
    SlidingWindowCache,
    StaticCache,
    make_cache,
)
from qkv.nn.layers import FeedForward, FeedForwardConfig, LayerNorm, RMSNorm, make_norm
from qkv.nn.models import (
    IGNORE_INDEX,
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
    "IGNORE_INDEX",
    "LSTMLM",
    "MODEL_KINDS",
    "TCNLM",
    "LSTMConfig",
    "TCNBlock",
    "TCNConfig",
    "matched_models",
    "parameter_counts",
    "token_embedding",
    "AttentionConfig",
    "CrossAttentionCache",
    "Decoder",
    "DecoderLM",
    "DecoderLayer",
    "DynamicCache",
    "Embeddings",
    "Encoder",
    "EncoderDecoder",
    "EncoderDecoderConfig",
    "EncoderLayer",
    "FeedForward",
    "FeedForwardConfig",
    "KVCache",
    "LayerNorm",
    "LearnedPositions",
    "MultiHeadAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "SinusoidalPositions",
    "SlidingWindowCache",
    "StaticCache",
    "TransformerConfig",
    "alibi_slopes",
    "make_cache",
    "make_norm",
    "positions_from_mask",
    "sinusoidal_table",
]
