"""qkv.nn models under torch.compile(fullgraph=True): no graph break, and the eager numbers.

fullgraph=True turns any graph break into an error, so compiling at all is the check that
there is none. The models are tiny and float64, compared with eager in loss, logits and every
parameter's gradient. Most tests use the aot_eager backend (the same graphs, forward and
backward, without inductor's code generation, which is slow on a small CPU); each compiled
model is built once per module.
"""

from __future__ import annotations

import pytest
import torch

from qkv.nn import (
    DecoderLM,
    DynamicCache,
    Encoder,
    EncoderDecoder,
    EncoderDecoderConfig,
    TransformerConfig,
)

VOCAB = 37


def _config(**overrides) -> TransformerConfig:
    settings = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_len=64)
    settings.update(overrides)
    return TransformerConfig(**settings)


def _ids(B: int, L: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, L), generator=torch.Generator().manual_seed(seed))


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _assert_same_run(model, compiled, loss_of, *args, **kwargs):
    """Run eager and compiled on the same inputs; compare outputs and parameter gradients."""
    model.zero_grad(set_to_none=True)
    eager_out = model(*args, **kwargs)
    loss_of(eager_out).backward()
    eager_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    out = compiled(*args, **kwargs)
    loss_of(out).backward()
    got = _grads(model)
    assert len(got) == len(eager_grads) > 0
    flat = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]
    flat_eager = [o for o in (eager_out if isinstance(eager_out, tuple) else (eager_out,))
                  if o is not None]
    for a, b in zip(flat + got, flat_eager + eager_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def _lm_loss(out):
    return out[1]


def _sum_loss(out):
    return (out * out).sum()


@pytest.fixture(scope="module")
def lm():
    """A DecoderLM (RoPE, GQA, window) and its compiled form, dynamic shapes."""
    torch.manual_seed(0)
    model = DecoderLM(_config(positions="rope", n_kv_heads=2, window=6)).double()
    torch._dynamo.reset()
    return model, torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")


def test_decoder_lm_compiles_fullgraph_and_matches_eager(lm):
    model, compiled = lm
    idx = _ids(2, 12)
    _assert_same_run(model, compiled, _lm_loss, idx, _ids(2, 12, seed=1))


def test_decoder_lm_dynamic_lengths_reuse_the_graph(lm):
    model, compiled = lm
    for L in (7, 16):
        _assert_same_run(model, compiled, _lm_loss, _ids(3, L, seed=L), _ids(3, L, seed=L + 1))


@pytest.mark.slow
def test_decoder_lm_left_padding_compiles(lm):
    model, compiled = lm
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :3] = False  # left padding, as generation pads
    targets = _ids(2, 9, seed=5).masked_fill(~mask, -100)
    _assert_same_run(model, compiled, _lm_loss, _ids(2, 9, seed=4), targets,
                     attention_mask=mask)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(1)
    model = Encoder(_config(positions="learned", n_token_types=2)).double()
    torch._dynamo.reset()
    return model, torch.compile(model, fullgraph=True, backend="aot_eager")


def test_encoder_with_lengths_and_mask_compiles(encoder):
    model, compiled = encoder
    idx = _ids(3, 10, seed=2)
    _assert_same_run(model, compiled, _sum_loss, idx, lengths=torch.tensor([10, 4, 7]))
    mask = torch.arange(10).expand(3, 10) < torch.tensor([[10], [6], [2]])
    _assert_same_run(model, compiled, _sum_loss, idx, attention_mask=mask)


@pytest.mark.slow
def test_encoder_decoder_alibi_compiles():
    torch.manual_seed(2)
    enc = _config(positions="alibi", n_layers=1)
    dec = _config(positions="alibi", n_layers=1, n_kv_heads=1)
    model = EncoderDecoder(EncoderDecoderConfig(encoder=enc, decoder=dec)).double()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    src, tgt = _ids(2, 8, seed=3), _ids(2, 5, seed=4)
    _assert_same_run(model, compiled, _lm_loss, src, tgt, _ids(2, 5, seed=6),
                     src_lengths=torch.tensor([8, 5]))


@pytest.mark.slow
def test_compiled_decoder_lm_in_float32_with_inductor_stays_close():
    """The default backend (inductor) in float32, on the demo's model shape at tiny size."""
    torch.manual_seed(3)
    model = DecoderLM(_config(n_layers=1))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    idx, targets = _ids(2, 16, seed=7), _ids(2, 16, seed=8)
    _, loss = compiled(idx, targets)
    _, want = model(idx, targets)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)


def _generate(model, idx, mask, steps: int = 2):
    """Greedy decoding through a DynamicCache: the prompt, then `steps` single tokens."""
    cache = DynamicCache()
    logits, _ = model(idx, attention_mask=mask, cache=cache, last_only=True)
    out = [logits]
    for _ in range(steps):
        tok = logits[:, -1].argmax(-1, keepdim=True)
        mask = None if mask is None else torch.cat((mask, torch.ones_like(tok, dtype=bool)), 1)
        logits, _ = model(tok, attention_mask=mask[:, -1:] if mask is not None else None,
                          cache=cache, last_only=True)
        out.append(logits)
    return torch.cat(out, dim=1)


def test_decoding_with_a_cache_compiles_fullgraph():
    """A whole greedy decode with a KV cache, left-padded prompts included, in one graph
    (dynamo only: backend "eager")."""
    torch.manual_seed(4)
    model = DecoderLM(_config(positions="rope", n_kv_heads=1)).double().eval()
    idx = _ids(2, 6, seed=9)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    torch._dynamo.reset()
    compiled = torch.compile(_generate, fullgraph=True, backend="eager")
    with torch.no_grad():
        for m in (None, mask):
            torch.testing.assert_close(compiled(model, idx, m), _generate(model, idx, m),
                                       atol=1e-12, rtol=1e-12)


def test_activation_checkpointing_compiles_fullgraph():
    torch.manual_seed(5)
    model = DecoderLM(_config(n_layers=2))
    model.set_activation_checkpointing(True)
    model.double()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _assert_same_run(model, compiled, _lm_loss, _ids(2, 8, seed=10), _ids(2, 8, seed=11))
