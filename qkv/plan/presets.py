"""Model shapes for `qkv plan`: named presets (shapes only, no weights) and TOML configs.

A preset is a TransformerConfig and the kind of model built on it: "decoder" (a DecoderLM) or
"encoder" (an Encoder, as MiniLM). Parameters are counted by building the model on the meta
device, so the count is qkv's own, exact, and allocates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qkv.nn import TransformerConfig

KINDS = ("decoder", "encoder")


@dataclass(frozen=True)
class ModelSpec:
    """A model to plan for: its name, kind ("decoder" or "encoder") and settings."""

    name: str
    kind: str
    config: TransformerConfig


def _gpt2(d_model: int, n_layers: int, n_heads: int) -> TransformerConfig:
    """The published GPT-2 shapes (vocab 50257, 1024 learned positions, tied embeddings)."""
    return TransformerConfig(vocab_size=50257, d_model=d_model, n_layers=n_layers,
                             n_heads=n_heads, max_len=1024, positions="learned",
                             activation="gelu_tanh", norm_placement="pre", bias=True,
                             tie_embeddings=True)


def _llama(d_model: int, n_layers: int, n_heads: int, d_ff: int, tied: bool) -> TransformerConfig:
    """Llama 3 shapes: GQA with 8 KV heads, SwiGLU, RMSNorm, RoPE, no biases, vocab 128256."""
    return TransformerConfig(vocab_size=128256, d_model=d_model, n_layers=n_layers,
                             n_heads=n_heads, n_kv_heads=8, d_ff=d_ff, max_len=131072,
                             positions="rope", rope_base=500000.0, activation="swiglu",
                             norm="rmsnorm", bias=False, tie_embeddings=tied)


def _minilm() -> TransformerConfig:
    """all-MiniLM-L6-v2: a BERT-style post-LN encoder (see qkv.interop.bert)."""
    return TransformerConfig(vocab_size=30522, d_model=384, n_layers=6, n_heads=12, d_ff=1536,
                             max_len=512, positions="learned", activation="gelu",
                             norm_eps=1e-12, norm_placement="post", embed_norm=True,
                             final_norm=False, n_token_types=2, bias=True,
                             tie_embeddings=False)


def _demo(seq_len: int) -> TransformerConfig:
    """`qkv train`'s default model: DEFAULT_MODEL on a 2048-token BPE vocabulary, its learned
    position table as long as the training window (max_len = seq_len, as in training)."""
    from qkv.train.config import DEFAULT_MODEL, TrainConfig

    return TransformerConfig.from_dict({**DEFAULT_MODEL, "max_len": max(seq_len, 1),
                                        "vocab_size": TrainConfig().vocab_size})


# name -> (kind, builder of the config from the planned sequence length)
PRESETS = {
    "demo": ("decoder", _demo),
    "minilm": ("encoder", lambda n: _minilm()),
    "gpt2": ("decoder", lambda n: _gpt2(768, 12, 12)),
    "gpt2-medium": ("decoder", lambda n: _gpt2(1024, 24, 16)),
    "gpt2-large": ("decoder", lambda n: _gpt2(1280, 36, 20)),
    "gpt2-xl": ("decoder", lambda n: _gpt2(1600, 48, 25)),
    "llama-1b": ("decoder", lambda n: _llama(2048, 16, 32, 8192, tied=True)),
    "llama-8b": ("decoder", lambda n: _llama(4096, 32, 32, 14336, tied=False)),
    "llama-70b": ("decoder", lambda n: _llama(8192, 80, 64, 28672, tied=False)),
}

# Published parameter totals the presets reproduce (tests check them).
PUBLISHED_PARAMS = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168,
                    "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200,
                    "llama-1b": 1_235_814_400, "llama-8b": 8_030_261_248,
                    "llama-70b": 70_553_706_496}


def load_model(model: str, seq_len: int = 1024) -> ModelSpec:
    """The ModelSpec of a preset name or of a `qkv train` TOML file.

    A TOML file is read as `qkv train` reads it (TrainConfig.from_toml): its [model] table over
    DEFAULT_MODEL, max_len defaulting to its seq_len, and the largest vocabulary its tokenizer
    can give. Raises ValueError naming the presets for an unknown name, FileNotFoundError for a
    missing file and ValueError for an invalid one.
    """
    if model in PRESETS:
        kind, build = PRESETS[model]
        return ModelSpec(model, kind, build(seq_len))
    if not model.endswith(".toml"):
        raise ValueError(f"unknown model {model!r}; choose a preset ({', '.join(PRESETS)}) "
                         "or give a config.toml")
    from qkv.train.config import TrainConfig, largest_vocab

    train = TrainConfig.from_toml(model)
    return ModelSpec(Path(model).name, "decoder", train.model_config(largest_vocab(train)))


def build(spec: ModelSpec, device: str | torch.device = "meta",
          dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The spec's model (DecoderLM or Encoder) on `device` (meta: shapes only)."""
    from qkv.nn import DecoderLM, Encoder

    with torch.device(device):
        model = (DecoderLM if spec.kind == "decoder" else Encoder)(spec.config)
    return model if dtype is None else model.to(dtype)


def count_params(spec: ModelSpec) -> int:
    """Parameters of the spec's model, tied weights once, counted on the meta device."""
    return sum(p.numel() for p in build(spec).parameters())

