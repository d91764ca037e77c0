"""Norms and the position-wise feed-forward network."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from qkv.nn.config import check_choice, check_float, check_int

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "swiglu")


class LayerNorm(nn.Module):
    """LayerNorm over the last dim, with an optional bias."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight).to(x.dtype)


def make_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    """A LayerNorm or RMSNorm by name."""
    check_choice("norm", kind, NORMS)
    return LayerNorm(dim, eps, bias) if kind == "layernorm" else RMSNorm(dim, eps)


@dataclass
class FeedForwardConfig:
    """Settings of the position-wise feed-forward network."""

    d_model: int
    d_ff: int
    activation: str = "gelu"  # relu | gelu (exact erf) | gelu_tanh | swiglu
    bias: bool = True
    dropout: float = 0.0

    def __post_init__(self):
        check_int("d_model", self.d_model)
        check_int("d_ff", self.d_ff)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_float("dropout", self.dropout, low=0.0, high=1.0)


class FeedForward(nn.Module):
    """fc_out(act(fc_in(x))), or fc_out(silu(fc_gate(x)) * fc_in(x)) for swiglu; then dropout."""

    def __init__(self, config: FeedForwardConfig):
        super().__init__()
        self.activation = config.activation
        self.fc_in = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.fc_gate = (
            nn.Linear(config.d_model, config.d_ff, bias=config.bias)
            if config.activation == "swiglu" else None
        )
        self.fc_out = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(x)  # (B, L, d_ff)
        if self.activation == "relu":
            h = F.relu(h)
        elif self.activation == "gelu":
            h = F.gelu(h)
        elif self.activation == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        else:
            h = F.silu(self.fc_gate(x)) * h
        return self.dropout(self.fc_out(h))  # (B, L, d_model)
