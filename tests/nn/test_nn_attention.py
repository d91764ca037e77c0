import math

import pytest
import torch

from qkv.nn import AttentionConfig, MultiHeadAttention


def _manual(mha: MultiHeadAttention, x, context=None, causal=False, key_mask=None):
    """Plain PyTorch multi-head attention with K/V heads repeated for GQA."""
    c = mha.config
    B, L, _ = x.shape
    D, Hq, Hk = c.head_dim, c.n_heads, c.n_kv_heads
    if c.cross:
        q = mha.q_proj(x)
        k, v = mha.kv_proj(context).split(Hk * D, dim=-1)
    else:
        q, k, v = mha.qkv_proj(x).split((Hq * D, Hk * D, Hk * D), dim=-1)
    Lk = k.shape[1]
    q = q.view(B, L, Hq, D).transpose(1, 2)
    k = k.view(B, Lk, Hk, D).transpose(1, 2).repeat_interleave(Hq // Hk, dim=1)
    v = v.view(B, Lk, Hk, D).transpose(1, 2).repeat_interleave(Hq // Hk, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    visible = torch.ones(L, Lk, dtype=torch.bool)
    if causal:
        visible = torch.ones(L, Lk, dtype=torch.bool).tril(Lk - L)
    visible = visible.expand(B, 1, L, Lk)
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    y = s.masked_fill(~visible, float("-inf")).softmax(-1) @ v
    return mha.out_proj(y.transpose(1, 2).reshape(B, L, Hq * D))


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_matches_plain_pytorch(n_kv_heads, causal):
    mha = MultiHeadAttention(AttentionConfig(d_model=32, n_heads=4, n_kv_heads=n_kv_heads))
    x = torch.randn(2, 6, 32)
    assert torch.allclose(mha(x, causal=causal), _manual(mha, x, causal=causal), atol=1e-5)


def test_cross_attention_with_padding_matches_plain_pytorch():
    mha = MultiHeadAttention(AttentionConfig(d_model=32, n_heads=4, n_kv_heads=2, cross=True))
    x, ctx = torch.randn(2, 3, 32), torch.randn(2, 7, 32)
    key_mask = torch.ones(2, 7, dtype=torch.bool)
    key_mask[1, 5:] = False
    ref = _manual(mha, x, ctx, key_mask=key_mask)
    assert torch.allclose(mha(x, ctx, key_padding_mask=key_mask), ref, atol=1e-5)
    assert torch.allclose(mha(x, ctx, kv_lengths=torch.tensor([7, 5])), ref, atol=1e-5)


def test_projections_have_optional_biases():
    mha = MultiHeadAttention(AttentionConfig(d_model=16, n_heads=2, bias=False))
    assert mha.qkv_proj.bias is None and mha.out_proj.bias is None
    cross = MultiHeadAttention(AttentionConfig(d_model=16, n_heads=2, cross=True))
    assert cross.q_proj.bias is not None and cross.kv_proj.bias is not None


def test_dropouts_act_only_in_training():
    mha = MultiHeadAttention(AttentionConfig(d_model=16, n_heads=2, attn_dropout=0.5, dropout=0.5))
    x = torch.randn(2, 5, 16)
    mha.eval()
    assert torch.equal(mha(x), mha(x))
    mha.train()
    torch.manual_seed(1)
    a = mha(x, backend="chunked")
    torch.manual_seed(1)
    assert torch.equal(a, mha(x, backend="chunked"))
    assert not torch.allclose(a, mha(x, backend="chunked"))


@pytest.mark.parametrize("positions", ["none", "rope", "alibi"])
def test_every_backend_agrees(positions, cpu_backends):
    cfg = AttentionConfig(d_model=32, n_heads=4, n_kv_heads=2, positions=positions, window=3)
    mha = MultiHeadAttention(cfg)
    x = torch.randn(2, 6, 32)
    key_mask = torch.ones(2, 6, dtype=torch.bool)
    key_mask[0, :2] = False
    ref = mha(x, causal=True, key_padding_mask=key_mask, backend="reference")
    for name in cpu_backends:
        out = mha(x, causal=True, key_padding_mask=key_mask, backend=name)
        assert torch.allclose(out, ref, atol=1e-5), name


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"), (dict(n_heads=3), "d_model"),
    (dict(n_heads=4, positions="learned"), "positions"), (dict(n_heads=4, window=-1), "window"),
    (dict(n_heads=4, cross=True, positions="rope"), "positions"),
    (dict(n_heads=4, attn_dropout=2.0), "attn_dropout"),
])
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AttentionConfig(d_model=32, **kwargs)


def test_bad_inputs_raise():
    mha = MultiHeadAttention(AttentionConfig(d_model=16, n_heads=2))
    with pytest.raises(ValueError, match="x must be"):
        mha(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="key_padding_mask"):
        mha(torch.randn(2, 5, 16), key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="context"):
        mha(torch.randn(2, 5, 16), torch.randn(2, 5, 16))
    cross = MultiHeadAttention(AttentionConfig(d_model=16, n_heads=2, cross=True))
    with pytest.raises(ValueError, match="context"):
        cross(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="backend"):
        mha(torch.randn(2, 5, 16), backend="nope")
