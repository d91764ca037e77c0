"""Two non-attention baselines with DecoderLM's calling convention, and a helper that builds all
three at matched parameter counts.

LSTMLM is torch.nn.LSTM over token embeddings; TCNLM is the temporal convolutional network of
Bai, Kolter & Koltun (2018), "An Empirical Evaluation of Generic Convolutional and Recurrent
Networks for Sequence Modeling": residual blocks of two dilated causal convolutions. Both map
idx (B, L) to (logits (B, L, V), loss or None) exactly as DecoderLM does, with the same loss
(mean cross-entropy over targets != IGNORE_INDEX, in float32 for half-precision models), so the
same training loop, evaluation and tasks run on all three.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from qkv.nn.config import check_choice, check_float, check_int, from_dict
from qkv.nn.models import DecoderLM, _check_ids, _lm_loss
from qkv.nn.transformer import TransformerConfig

MODEL_KINDS = ("transformer", "lstm", "tcn")


class _TokenLM(nn.Module):
    """What both baselines share: a token embedding, a body (B, L, d) -> (B, L, d), dropout,
    and an lm_head (optionally tied to the embedding)."""

    def __init__(self, config, body: nn.Module, emb_std: float):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.tok_emb.weight, std=emb_std)
        self.body = body
        self.dropout = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=emb_std)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx, targets=None):
        """idx (B, L) -> (logits (B, L, V), loss or None); targets (B, L) gives the mean
        cross-entropy over entries != IGNORE_INDEX, as in DecoderLM."""
        _check_ids("idx", idx, self.config.vocab_size)
        x = self.dropout(self.tok_emb(idx))  # (B, L, d)
        logits = self.lm_head(self.dropout(self.body(x)))  # (B, L, V)
        return logits, _lm_loss(logits, targets)

    def num_params(self) -> int:
        """Number of parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())


@dataclass
class LSTMConfig:
    """An LSTM language model's settings; d_model is both the embedding and the hidden width."""

    vocab_size: int
    d_model: int = 256
    n_layers: int = 2
    dropout: float = 0.0  # on the embeddings, between LSTM layers and before lm_head
    tie_embeddings: bool = True

    def __post_init__(self):
        check_int("vocab_size", self.vocab_size)
        check_int("d_model", self.d_model)
        check_int("n_layers", self.n_layers)
        check_float("dropout", self.dropout, low=0.0, high=1.0)
        check_choice("tie_embeddings", self.tie_embeddings, (True, False))

    @classmethod
    def from_dict(cls, values: dict) -> LSTMConfig:
        """Build from a dict, raising ValueError on unknown keys."""
        return from_dict(cls, values)


class _LSTMBody(nn.Module):
    def __init__(self, c: LSTMConfig):
        super().__init__()
        self.lstm = nn.LSTM(c.d_model, c.d_model, num_layers=c.n_layers, batch_first=True,
                            dropout=c.dropout if c.n_layers > 1 else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]  # (B, L, d): the last layer's hidden state at every step


class LSTMLM(_TokenLM):
    """Token embedding -> torch.nn.LSTM stack (batch_first, PyTorch's default initialisation)
    -> lm_head. Causal by construction: the output at t has read tokens 0..t only."""

    def __init__(self, config: LSTMConfig):
        super().__init__(config, _LSTMBody(config), emb_std=0.02)

    def sequential_steps(self, seq_len: int) -> int:
        """Steps that must run one after another on a sequence of seq_len tokens: one per
        token (the recurrence), however wide the machine."""
        check_int("seq_len", seq_len)
        return seq_len


@dataclass
class TCNConfig:
    """A TCN language model's settings. Block i has two causal convolutions of dilation 2**i, so
    `depth` blocks see receptive_field = 1 + 2 * (kernel_size - 1) * (2**depth - 1) tokens."""

    vocab_size: int
    d_model: int = 256  # embedding width and channels of every convolution
    kernel_size: int = 3
    n_blocks: int | None = None  # None: the fewest blocks whose receptive field covers max_len
    max_len: int = 1024  # only sets n_blocks when that is None; any length runs
    dropout: float = 0.0  # on the embeddings, after each convolution and before lm_head
    tie_embeddings: bool = True

    def __post_init__(self):
        check_int("vocab_size", self.vocab_size)
        check_int("d_model", self.d_model)
        check_int("kernel_size", self.kernel_size, minimum=2)
        check_int("n_blocks", self.n_blocks, optional=True)
        check_int("max_len", self.max_len)
        check_float("dropout", self.dropout, low=0.0, high=1.0)
        check_choice("tie_embeddings", self.tie_embeddings, (True, False))

    @property
    def depth(self) -> int:
        """The number of residual blocks: n_blocks, or the fewest whose field covers max_len."""
        if self.n_blocks is not None:
            return self.n_blocks
        depth = 1
        while _receptive_field(self.kernel_size, depth) < self.max_len:
            depth += 1
        return depth

    @property
    def receptive_field(self) -> int:
        """Tokens one output sees: itself and the receptive_field - 1 before it."""
        return _receptive_field(self.kernel_size, self.depth)

    @classmethod
    def from_dict(cls, values: dict) -> TCNConfig:
        """Build from a dict, raising ValueError on unknown keys."""
        return from_dict(cls, values)


def _receptive_field(kernel_size: int, depth: int) -> int:
    return 1 + 2 * (kernel_size - 1) * (2 ** depth - 1)


class TCNBlock(nn.Module):
    """The TCN paper's residual block: relu(x + F(x)), F = two rounds of dilated causal Conv1d
    (weight-normalised) -> ReLU -> dropout.

    The convolutions keep PyTorch's default initialisation, which is what the paper's code
    (locuslab/TCN) trains with: its N(0, 0.01) draw is overwritten by weight_norm's forward
    hook (locuslab/TCN issue #1).

    Causal: each convolution is left-padded by (kernel_size - 1) * dilation, so the output at t
    reads inputs t - 2 * (kernel_size - 1) * dilation .. t and nothing later. Input and output
    have the same width, so the residual needs no 1x1 convolution.
    """

    def __init__(self, d_model: int, kernel_size: int, dilation: int, dropout: float = 0.0):
        super().__init__()
        check_int("d_model", d_model)
        check_int("kernel_size", kernel_size, minimum=2)
        check_int("dilation", dilation)
        check_float("dropout", dropout, low=0.0, high=1.0)
        self.pad = (kernel_size - 1) * dilation
        self.conv1 = self._conv(d_model, kernel_size, dilation)
        self.conv2 = self._conv(d_model, kernel_size, dilation)
        self.dropout = nn.Dropout(dropout)

    @staticmethod
    def _conv(d_model: int, kernel_size: int, dilation: int) -> nn.Module:
        return weight_norm(nn.Conv1d(d_model, d_model, kernel_size, dilation=dilation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, d) -> (B, L, d), causal."""
        y = x.transpose(1, 2)  # (B, d, L)
        for conv in (self.conv1, self.conv2):
            y = self.dropout(F.relu(conv(F.pad(y, (self.pad, 0)))))  # (B, d, L)
        return F.relu(x + y.transpose(1, 2))


class TCNLM(_TokenLM):
    """Token embedding -> `config.depth` TCNBlocks of dilations 1, 2, 4, ... -> lm_head.

    The paper feeds the copy task's digits as one input channel; here tokens are embedded, as
    in its language-model experiments, so that the three models share one input interface.
    """

    def __init__(self, config: TCNConfig):
        body = nn.Sequential(*(TCNBlock(config.d_model, config.kernel_size, 2 ** i,
                                        config.dropout) for i in range(config.depth)))
        super().__init__(config, body, emb_std=0.01)

    def sequential_steps(self, seq_len: int) -> int:
        """Steps that must run one after another: one per block (every position of a block runs
        in parallel), whatever seq_len is."""
        check_int("seq_len", seq_len)
        return self.config.depth


def token_embedding(model: nn.Module) -> nn.Embedding:
    """The token embedding of a DecoderLM (model.embed.tok_emb), LSTMLM or TCNLM
    (model.tok_emb). Raises ValueError for any other model."""
    if isinstance(model, DecoderLM):
        return model.embed.tok_emb
    if isinstance(model, _TokenLM):
        return model.tok_emb
    raise ValueError(f"model must be a DecoderLM, LSTMLM or TCNLM, got {type(model).__name__}")


def parameter_counts(models: dict[str, nn.Module]) -> dict[str, int]:
    """{name: number of parameters (tied weights counted once)} for each model."""
    return {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}


def lstm_num_params(config: LSTMConfig) -> int:
    """LSTMLM(config).num_params() without building it: embedding (and an untied lm_head),
    then per layer four gates of input and recurrent weights, each with torch's two biases."""
    d = config.d_model
    head = 0 if config.tie_embeddings else config.vocab_size * d
    return config.vocab_size * d + head + config.n_layers * 4 * (2 * d * d + 2 * d)


def tcn_num_params(config: TCNConfig) -> int:
    """TCNLM(config).num_params() without building it: embedding (and an untied lm_head), then
    per block two convolutions, each with weight, bias and weight norm's per-channel gain."""
    d = config.d_model
    head = 0 if config.tie_embeddings else config.vocab_size * d
    return config.vocab_size * d + head + config.depth * 2 * (config.kernel_size * d * d + 2 * d)


def _solve_width(count: Callable[[int], int], target: int) -> tuple[int, int]:
    """The width whose parameter count is nearest `target` (counts grow with width): (width,
    count)."""
    high = 1
    while count(high) < target:
        high *= 2
    low = max(1, high // 2)
    while high - low > 1:  # invariant: count(low) < target <= count(high), unless low == 1
        middle = (low + high) // 2
        if count(middle) < target:
            low = middle
        else:
            high = middle
    return min(((w, count(w)) for w in (low, high)), key=lambda wc: abs(wc[1] - target))


def matched_models(vocab_size: int, *, d_model: int, n_layers: int, n_heads: int, seq_len: int,
                   positions: str = "learned", backend: str = "auto",
                   tolerance: float = 0.05) -> dict[str, nn.Module]:
    """A transformer, an LSTM and a TCN with parameter counts within `tolerance` of each other.

    The transformer, DecoderLM(TransformerConfig(vocab_size, d_model, n_layers, n_heads,
    max_len=seq_len, positions=positions, backend=backend)), sets the target count. The LSTM
    keeps n_layers layers (at least one) and its width is the integer whose count is nearest
    the target; if that misses by more than `tolerance` (only at tiny widths, where one unit of
    width moves the count by more than the tolerance), it drops to fewer, wider layers, down to
    one. The TCN has kernel 3 and the fewest blocks whose receptive field covers seq_len, and its
    width is solved the same way. All three tie lm_head to the token embedding and are built
    with the current torch RNG (seed it first for reproducible weights).

    Returns {"transformer": ..., "lstm": ..., "tcn": ...} (the order of MODEL_KINDS). Raises
    ValueError naming the argument at fault (the TransformerConfig fields, tolerance), or naming
    d_model when no width brings a baseline within tolerance.
    """
    check_float("tolerance", tolerance, low=0.0, high=1.0, low_open=True)
    transformer = DecoderLM(TransformerConfig(vocab_size, d_model, n_layers, n_heads,
                                              max_len=seq_len, positions=positions,
                                              backend=backend))
    target = transformer.num_params()
    lstm_config = None
    for layers in range(max(1, n_layers), 0, -1):
        width, count = _solve_width(
            lambda w, n=layers: lstm_num_params(LSTMConfig(vocab_size, w, n)), target)
        if abs(count - target) <= tolerance * target:
            lstm_config = LSTMConfig(vocab_size, width, layers)
            break
    width, count = _solve_width(
        lambda w: tcn_num_params(TCNConfig(vocab_size, w, max_len=seq_len)), target)
    if lstm_config is None or abs(count - target) > tolerance * target:
        kind = "an LSTM" if lstm_config is None else "a TCN"
        raise ValueError(f"d_model={d_model}: no width brings {kind} within tolerance="
                         f"{tolerance:g} of the transformer's {target} parameters; use a larger "
                         f"d_model or tolerance")
    return {"transformer": transformer, "lstm": LSTMLM(lstm_config),
            "tcn": TCNLM(TCNConfig(vocab_size, width, max_len=seq_len))}


__all__ = ["MODEL_KINDS", "LSTMConfig", "LSTMLM", "TCNBlock", "TCNConfig", "TCNLM",
           "lstm_num_params", "matched_models", "parameter_counts", "tcn_num_params",
           "token_embedding"]
