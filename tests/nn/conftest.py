"""Shared helpers for the qkv.nn tests: tiny configs and the backends to compare."""

import pytest
import torch

import qkv
from qkv.nn import TransformerConfig


def _tiny(**overrides) -> TransformerConfig:
    settings = dict(vocab_size=37, d_model=32, n_layers=2, n_heads=4, max_len=64)
    settings.update(overrides)
    return TransformerConfig(**settings)


@pytest.fixture
def tiny():
    """Factory of small TransformerConfigs."""
    return _tiny


@pytest.fixture
def cpu_backends():
    """Every backend usable on the CPU (triton under TRITON_INTERPRET=1 included)."""
    return qkv.backends("cpu")


@pytest.fixture
def fast_backends():
    """The CPU backends without triton, whose interpreter is too slow for whole models."""
    return [name for name in qkv.backends("cpu") if name != "triton"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def left_padded():
    """Factory of left-padded batches (a fixture: `from conftest import` can find another
    directory's conftest when several test folders run together)."""
    return _left_padded


def _left_padded(B: int, L: int, pads: list[int], vocab: int = 37):
    """Random ids (B, L) and a left-padding mask with pads[b] padding tokens in row b."""
    idx = torch.randint(0, vocab, (B, L))
    mask = torch.ones(B, L, dtype=torch.bool)
    for b, p in enumerate(pads):
        mask[b, :p] = False
    return idx, mask
