"""qkv.nn models on packed rows (cu_seqlens) under torch.compile(fullgraph=True).

Compiled, positions restart per sequence and attention stays within each sequence through
tensor ops only (no offset is read on the host), so the graph has no break; the numbers are
eager's: float64 logits, loss and every parameter's gradient within 1e-10. aot_eager backend
(forward and backward graphs without inductor's code generation); one compiled model per module.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from qkv.nn import DecoderLM, Encoder, EncoderDecoder, EncoderDecoderConfig, TransformerConfig

VOCAB = 37


def _config(**overrides) -> TransformerConfig:
    settings = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_len=64)
    settings.update(overrides)
    return TransformerConfig(**settings)


def _packed(lengths, seed=0):
    """Token ids (T,) of sequences of `lengths` back to back, targets (T,) and cu_seqlens."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return (torch.randint(0, VOCAB, (total,), generator=g),
            torch.randint(0, VOCAB, (total,), generator=g), cu)


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _assert_same_run(model, compiled, loss_of, *args, **kwargs):
    """Eager and compiled on the same inputs: outputs and parameter gradients."""
    results = []
    for fn in (model, compiled):
        model.zero_grad(set_to_none=True)
        out = fn(*args, **kwargs)
        loss_of(out).backward()
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]
        results.append(outs + _grads(model))
    assert len(results[0]) == len(results[1]) > 2
    for a, b in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.fixture(scope="module")
def lm():
    """A DecoderLM (RoPE, GQA, window), compiled with dynamic shapes, and its frame counter."""
    torch.manual_seed(0)
    model = DecoderLM(_config(positions="rope", n_kv_heads=2, window=3)).double()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    return model, torch.compile(model, fullgraph=True, dynamic=True, backend=counter), counter


def test_packed_decoder_lm_compiles_fullgraph_and_matches_eager(lm):
    model, compiled, counter = lm
    frames = []
    for seed, lengths in enumerate(([5, 1, 7, 3], [2, 9, 1], [4, 4, 1, 6, 2])):
        idx, targets, cu = _packed(lengths, seed)
        _assert_same_run(model, compiled, lambda out: out[1], idx, targets, cu_seqlens=cu)
        frames.append(counter.frame_count)
    assert frames == frames[:1] * 3  # one graph for every packing: no recompilation


def test_packed_encoder_compiles_fullgraph_and_matches_eager():
    """Learned positions (restarting per sequence), token types, ALiBi-free bidirectional
    attention with a two-sided window."""
    torch.manual_seed(1)
    model = Encoder(_config(positions="learned", n_token_types=2, window=2)).double()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    idx, _, cu = _packed([3, 1, 6, 2], seed=3)
    _assert_same_run(model, compiled, lambda out: (out * out).sum(), idx,
                     token_type_ids=idx % 2, cu_seqlens=cu)


def test_packed_encoder_with_alibi_compiles_fullgraph_and_matches_eager():
    torch.manual_seed(2)
    model = Encoder(_config(positions="alibi", n_layers=1)).double()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    idx, _, cu = _packed([4, 1, 5], seed=4)
    _assert_same_run(model, compiled, lambda out: (out * out).sum(), idx, cu_seqlens=cu)


@pytest.mark.slow
def test_packed_encoder_decoder_compiles_fullgraph_and_matches_eager():
    """Packed cross-attention: target sequence b reads source sequence b."""
    torch.manual_seed(3)
    config = EncoderDecoderConfig(encoder=_config(n_layers=1),
                                  decoder=_config(n_layers=1, positions="rope", n_kv_heads=1))
    model = EncoderDecoder(config).double()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    src, _, src_cu = _packed([4, 6, 1], seed=5)
    tgt, targets, tgt_cu = _packed([3, 1, 5], seed=6)
    _assert_same_run(model, compiled, lambda out: out[1], src, tgt, targets,
                     src_cu_seqlens=src_cu, tgt_cu_seqlens=tgt_cu)
