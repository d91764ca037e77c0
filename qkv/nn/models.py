"""Encoder, Decoder, DecoderLM and EncoderDecoder built from the layers in transformer.py.

Padding is given either as `lengths` (B,) (right padding: tokens at or past the length are padding)
or as `attention_mask` (B, L), True / 1 for real tokens (any padding; generation uses left
padding). Positions are absolute and padding does not count toward them: the first real token of
every row is position 0.

Packed rows are the other input form: idx (T,) holds the sequences back to back with no padding,
and `cu_seqlens` (B+1,) int offsets say where each starts (sequence b is rows
cu_seqlens[b]:cu_seqlens[b+1]). Each sequence then sees only itself, its positions restart at 0,
and the hidden states are (T, d_model): the same numbers as each sequence run alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qkv.nn.config import check_choice, check_unpadded, from_dict
from qkv.nn.positions import (
    LearnedPositions,
    SinusoidalPositions,
    positions_from_cu_seqlens,
    positions_from_mask,
)
from qkv.nn.transformer import DecoderLayer, EncoderLayer, TransformerConfig

IGNORE_INDEX = -100  # targets equal to this are left out of the loss


def _init_weights(module: nn.Module) -> None:
    """nanoGPT's initialisation: N(0, 0.02) weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


def _traced() -> bool:
    """Whether torch.compile is tracing: checks of tensor values would break the graph there."""
    return torch.compiler.is_compiling()


def _check_ids(name: str, ids: torch.Tensor, vocab_size: int, packed: bool = False) -> None:
    dims, shape = (1, "(T,) with cu_seqlens") if packed else (2, "(B, L)")
    if not isinstance(ids, torch.Tensor) or ids.dim() != dims or ids.dtype.is_floating_point:
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be an integer tensor {shape}, got {got}")
    if _traced():  # value checks read tensors; a compiled graph leaves them out
        return
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"{name} must lie in [0, vocab_size={vocab_size}), got values in "
            f"[{int(ids.min())}, {int(ids.max())}]"
        )


def _padding(attention_mask, lengths, B: int, L: int, device):
    """Validate the two padding forms; return (bool mask (B, L) or None, lengths (B,) or None)."""
    if attention_mask is not None and lengths is not None:
        raise ValueError("give padding as attention_mask or lengths, not both")
    if attention_mask is not None:
        if attention_mask.shape != (B, L):
            raise ValueError(
                f"attention_mask must be (B, L) = {(B, L)}, got {tuple(attention_mask.shape)}"
            )
        mask = attention_mask.to(device=device, dtype=torch.bool)
        if _traced():  # keeping an all-True mask gives the same result without a graph break
            return mask, None
        return (None if bool(mask.all()) else mask), None
    if lengths is not None:
        if lengths.shape != (B,) or lengths.dtype.is_floating_point:
            raise ValueError(f"lengths must be an integer tensor (B,) = ({B},), got "
                             f"{tuple(lengths.shape)} {lengths.dtype}")
        if B and not _traced() and (int(lengths.min()) < 0 or int(lengths.max()) > L):
            raise ValueError(f"lengths must lie in [0, L={L}], got {lengths.tolist()}")
        return None, lengths.to(device)
    return None, None


def _packed_positions(idx, cu_seqlens, vocab_size: int, **unused) -> torch.Tensor:
    """Check packed token ids (T,) and return their positions (T,); `unused` are the padding and
    cache arguments, which packed rows do not take."""
    check_unpadded(**unused)
    _check_ids("idx", idx, vocab_size, packed=True)
    return positions_from_cu_seqlens(cu_seqlens, idx.shape[0])


class Embeddings(nn.Module):
    """Token (+ absolute position) (+ token type) embeddings, optional norm, dropout."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        c = config
        self.config = c
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = None
        if c.positions == "learned":
            self.pos_emb = LearnedPositions(c.max_len, c.d_model)
        elif c.positions == "sinusoidal":
            self.pos_emb = SinusoidalPositions(c.max_len, c.d_model)
        self.type_emb = nn.Embedding(c.n_token_types, c.d_model) if c.n_token_types else None
        self.norm = c.make_norm() if c.embed_norm else None
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, idx, positions, token_type_ids=None) -> torch.Tensor:
        """idx (B, L), positions (B, L) -> (B, L, d_model); packed idx, positions (T,) ->
        (T, d_model)."""
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions).to(x.dtype)  # the sinusoidal table stays float32
        if self.type_emb is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(idx)
            _check_ids("token_type_ids", token_type_ids, self.config.n_token_types,
                       packed=idx.dim() == 1)
            x = x + self.type_emb(token_type_ids)
        elif token_type_ids is not None:
            raise ValueError("token_type_ids given but the config has n_token_types=0")
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)


class _LayerStack(nn.Module):
    """What Encoder and Decoder share: calling each layer, with optional activation
    checkpointing."""

    activation_checkpointing = False

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each layer's activations in backward instead of keeping them (memory for
        time). Applies while grad is enabled and no cache is given; parameters are unchanged."""
        check_choice("enabled", enabled, (True, False))
        self.activation_checkpointing = enabled

    def _call(self, layer: nn.Module, *args, cached: bool = False, **kwargs) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled() and not cached:
            return checkpoint(layer, *args, use_reentrant=False, **kwargs)
        return layer(*args, **kwargs)


class Encoder(_LayerStack):
    """Embeddings, n_layers bidirectional EncoderLayers, optional final norm."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embed = Embeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_layers))
        self.final_norm = config.make_norm() if config.has_final_norm else None
        self.apply(_init_weights)

    def forward(self, idx, *, attention_mask=None, lengths=None, token_type_ids=None,
                backend=None, cu_seqlens=None) -> torch.Tensor:
        """idx (B, L) token ids -> hidden states (B, L, d_model); packed rows idx (T,) with
        cu_seqlens (B+1,) -> (T, d_model)."""
        if cu_seqlens is not None:
            positions = _packed_positions(idx, cu_seqlens, self.config.vocab_size,
                                          attention_mask=attention_mask, lengths=lengths)
            mask = None
        else:
            _check_ids("idx", idx, self.config.vocab_size)
            B, L = idx.shape
            mask, lengths = _padding(attention_mask, lengths, B, L, idx.device)
            positions = positions_from_mask(mask, B, L, idx.device)
        x = self.embed(idx, positions, token_type_ids)  # (B, L, d_model) or (T, d_model)
        for layer in self.layers:
            x = self._call(layer, x, positions=positions, kv_lengths=lengths,
                           key_padding_mask=mask, backend=backend, cu_seqlens=cu_seqlens)
        return self.final_norm(x) if self.final_norm is not None else x


class Decoder(_LayerStack):
    """Embeddings, n_layers causal DecoderLayers (with cross-attention if `cross`), final norm."""

    def __init__(self, config: TransformerConfig, cross: bool = False):
        super().__init__()
        self.config = config
        self.embed = Embeddings(config)
        self.layers = nn.ModuleList(DecoderLayer(config, cross) for _ in range(config.n_layers))
        self.final_norm = config.make_norm() if config.has_final_norm else None
        self.apply(_init_weights)

    def forward(self, idx, memory=None, *, attention_mask=None, lengths=None,
                memory_mask=None, memory_lengths=None, cache=None, cross_cache=None,
                backend=None, cu_seqlens=None, memory_cu_seqlens=None) -> torch.Tensor:
        """idx (B, L), memory (B, Lm, d_model) -> hidden states (B, L, d_model).

        With a cache, idx holds only the new tokens and attention_mask (B, L) only their padding
        (left padding in the prompt); the cache keeps the earlier keys, their padding and each
        row's position offset. Packed rows: idx (T,) with cu_seqlens -> (T, d_model), each
        sequence causal within itself; a packed memory (Tm, d_model) comes with
        memory_cu_seqlens, and sequence b cross-attends to memory sequence b.
        """
        if cu_seqlens is not None:
            positions = _packed_positions(
                idx, cu_seqlens, self.config.vocab_size, attention_mask=attention_mask,
                lengths=lengths, memory_mask=memory_mask, memory_lengths=memory_lengths,
                cache=cache, cross_cache=cross_cache)
            x = self.embed(idx, positions)  # (T, d_model)
            for i, layer in enumerate(self.layers):
                x = self._call(layer, x, memory, positions=positions, layer_idx=i,
                               backend=backend, cu_seqlens=cu_seqlens,
                               memory_cu_seqlens=memory_cu_seqlens)
            return self.final_norm(x) if self.final_norm is not None else x
        if memory_cu_seqlens is not None:
            raise ValueError("memory_cu_seqlens describes a packed memory; pack idx too "
                             "(cu_seqlens)")
        _check_ids("idx", idx, self.config.vocab_size)
        B, L = idx.shape
        mask, lengths = _padding(attention_mask, lengths, B, L, idx.device)
        if cache is not None:
            if lengths is not None:
                raise ValueError("with a cache, give padding as attention_mask, not lengths")
            window = self.config.window
            if getattr(cache, "window", None) is not None and (window is None or
                                                               cache.window < window):
                raise ValueError(
                    f"a SlidingWindowCache of window {cache.window} needs a model whose "
                    f"config.window is at most that, got window={window}"
                )
            positions, key_mask = cache.step(mask, B, L, idx.device)
        else:
            positions, key_mask = positions_from_mask(mask, B, L, idx.device), mask
        x = self.embed(idx, positions)  # (B, L, d_model)
        cached = cache is not None or cross_cache is not None
        for i, layer in enumerate(self.layers):
            x = self._call(layer, x, memory, positions=positions, kv_lengths=lengths,
                           key_padding_mask=key_mask, memory_lengths=memory_lengths,
                           memory_mask=memory_mask, cache=cache, cross_cache=cross_cache,
                           layer_idx=i, backend=backend, cached=cached)
        return self.final_norm(x) if self.final_norm is not None else x


def _last(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """The last position of each row (B, 1, d_model), of (B, L, d) or of packed rows (T, d)."""
    return x[:, -1:] if cu_seqlens is None else x[cu_seqlens[1:].long() - 1, None]


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor | None):
    if targets is None:
        return None
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have the shape of idx, {tuple(logits.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    if flat.dtype != torch.float64:
        flat = flat.float()  # the loss of a half-precision model in float32
    return F.cross_entropy(flat, targets.flatten(), ignore_index=IGNORE_INDEX)


class DecoderLM(Decoder):
    """A decoder-only language model: Decoder + lm_head (optionally tied to tok_emb)."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config, cross=False)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.tok_emb.weight

    def forward(self, idx, targets=None, *, attention_mask=None, lengths=None, cache=None,
                last_only=False, backend=None, cu_seqlens=None):
        """idx (B, L) -> (logits (B, L, V), loss or None); nanoGPT's calling convention.

        targets (B, L) gives the mean cross-entropy over entries != IGNORE_INDEX. `last_only`
        returns only the last position's logits (B, 1, V), as generation needs. Packed rows:
        idx and targets (T,) with cu_seqlens give logits (T, V) (last_only: each sequence's
        last token, (B, 1, V)).
        """
        x = super().forward(idx, attention_mask=attention_mask, lengths=lengths, cache=cache,
                            backend=backend, cu_seqlens=cu_seqlens)
        if last_only and targets is None:
            x = _last(x, cu_seqlens)
        logits = self.lm_head(x)
        return logits, _lm_loss(logits, targets)

    def num_params(self) -> int:
        """Number of parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())


@dataclass
class EncoderDecoderConfig:
    """An encoder's and a decoder's settings; d_model must agree for cross-attention."""

    encoder: TransformerConfig
    decoder: TransformerConfig
    share_embeddings: bool = False  # the decoder reuses the encoder's token embedding

    def __post_init__(self):
        for name in ("encoder", "decoder"):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, TransformerConfig.from_dict(value))
            elif not isinstance(value, TransformerConfig):
                raise ValueError(f"{name} must be a TransformerConfig, got {type(value).__name__}")
        check_choice("share_embeddings", self.share_embeddings, (True, False))
        if self.encoder.d_model != self.decoder.d_model:
            raise ValueError(f"encoder.d_model ({self.encoder.d_model}) must equal "
                             f"decoder.d_model ({self.decoder.d_model})")
        if self.share_embeddings and self.encoder.vocab_size != self.decoder.vocab_size:
            raise ValueError("share_embeddings needs encoder.vocab_size == decoder.vocab_size")

    @classmethod
    def from_dict(cls, values: dict) -> EncoderDecoderConfig:
        """Build from a dict, raising ValueError on unknown keys."""
        return from_dict(cls, values)


class EncoderDecoder(nn.Module):
    """Encoder + cross-attending Decoder + lm_head: the original Transformer."""

    def __init__(self, config: EncoderDecoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.encoder)
        self.decoder = Decoder(config.decoder, cross=True)
        if config.share_embeddings:
            self.decoder.embed.tok_emb.weight = self.encoder.embed.tok_emb.weight
        self.lm_head = nn.Linear(config.decoder.d_model, config.decoder.vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        if config.decoder.tie_embeddings:
            self.lm_head.weight = self.decoder.embed.tok_emb.weight

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing of every encoder and decoder layer (see Encoder's)."""
        self.encoder.set_activation_checkpointing(enabled)
        self.decoder.set_activation_checkpointing(enabled)

    def encode(self, src, *, src_mask=None, src_lengths=None, backend=None,
               src_cu_seqlens=None) -> torch.Tensor:
        """src (B, Ls) -> memory (B, Ls, d_model); packed src (Ts,) -> (Ts, d_model)."""
        return self.encoder(src, attention_mask=src_mask, lengths=src_lengths, backend=backend,
                            cu_seqlens=src_cu_seqlens)

    def decode(self, tgt, memory, *, tgt_mask=None, memory_mask=None, memory_lengths=None,
               cache=None, cross_cache=None, last_only=False, backend=None,
               tgt_cu_seqlens=None, memory_cu_seqlens=None) -> torch.Tensor:
        """tgt (B, L), memory (B, Ls, d_model) -> logits (B, L, V) (or (B, 1, V) if last_only).
        Packed: tgt (T,) and memory (Ts, d_model) with their cu_seqlens -> logits (T, V)."""
        x = self.decoder(tgt, memory, attention_mask=tgt_mask, memory_mask=memory_mask,
                         memory_lengths=memory_lengths, cache=cache, cross_cache=cross_cache,
                         backend=backend, cu_seqlens=tgt_cu_seqlens,
                         memory_cu_seqlens=memory_cu_seqlens)
        return self.lm_head(_last(x, tgt_cu_seqlens) if last_only else x)

    def forward(self, src, tgt, targets=None, *, src_mask=None, src_lengths=None,
                tgt_mask=None, backend=None, src_cu_seqlens=None, tgt_cu_seqlens=None):
        """src (B, Ls), tgt (B, L) -> (logits (B, L, V), loss or None). Packed: src (Ts,) and
        tgt, targets (T,) with src_cu_seqlens and tgt_cu_seqlens -> logits (T, V); target
        sequence b reads source sequence b."""
        if src_mask is not None:
            src_mask = src_mask.bool()
        memory = self.encode(src, src_mask=src_mask, src_lengths=src_lengths, backend=backend,
                             src_cu_seqlens=src_cu_seqlens)
        logits = self.decode(tgt, memory, tgt_mask=tgt_mask, memory_mask=src_mask,
                             memory_lengths=src_lengths, backend=backend,
                             tgt_cu_seqlens=tgt_cu_seqlens, memory_cu_seqlens=src_cu_seqlens)
        return logits, _lm_loss(logits, targets)
