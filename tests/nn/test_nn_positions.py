import copy
import math

import pytest
import torch

from qkv.nn import (
    DecoderLM,
    RotaryEmbedding,
    SinusoidalPositions,
    TransformerConfig,
    alibi_slopes,
    sinusoidal_table,
)
from qkv.nn.positions import positions_from_mask


def test_alibi_slopes_power_of_two():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))


@pytest.mark.parametrize("n", [1, 3, 6, 12, 24])
def test_alibi_slopes_interpolate_for_other_head_counts(n):
    p = 2 ** int(math.floor(math.log2(n)))
    base = [2 ** (-8 * (i + 1) / p) for i in range(p)]
    extra = [2 ** (-8 * (i + 1) / (2 * p)) for i in range(2 * p)][0::2][: n - p]
    assert torch.allclose(alibi_slopes(n), torch.tensor(base + extra))


def test_sinusoidal_table_matches_the_formula():
    t = sinusoidal_table(10, 8)
    pos, i = 7, 2
    assert math.isclose(t[pos, 2 * i], math.sin(pos / 10000 ** (2 * i / 8)), rel_tol=1e-6)
    assert math.isclose(t[pos, 2 * i + 1], math.cos(pos / 10000 ** (2 * i / 8)), rel_tol=1e-6)


def test_position_table_rejects_positions_past_max_len():
    with pytest.raises(ValueError, match="max_len"):
        SinusoidalPositions(4, 8)(torch.tensor([[0, 4]]))


def test_positions_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert positions_from_mask(mask, 2, 4, "cpu").tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    offset = torch.tensor([5, 1])
    assert positions_from_mask(None, 2, 2, "cpu", offset).tolist() == [[5, 6], [1, 2]]


@pytest.mark.parametrize("scaling", [None, "linear", "ntk"])
def test_rope_scores_depend_only_on_relative_position(scaling):
    rope = RotaryEmbedding(8, base=100.0, scaling=scaling, factor=2.0)
    q, k = torch.randn(2, 1, 1, 1, 8, dtype=torch.float64)
    def score(i, j):
        return (rope(q, torch.tensor([[i]])) * rope(k, torch.tensor([[j]]))).sum()
    assert torch.allclose(score(3, 1), score(10, 8))
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_rope_linear_scaling_divides_positions():
    x = torch.randn(2, 3, 4, 8)
    pos = torch.arange(4).expand(2, 4) * 2
    scaled = RotaryEmbedding(8, scaling="linear", factor=2.0)(x, pos)
    assert torch.allclose(scaled, RotaryEmbedding(8)(x, pos // 2), atol=1e-6)


def test_rope_ntk_raises_the_base():
    x, pos = torch.randn(1, 1, 3, 8), torch.arange(3)[None]
    ntk = RotaryEmbedding(8, base=10000.0, scaling="ntk", factor=4.0)(x, pos)
    plain = RotaryEmbedding(8, base=10000.0 * 4.0 ** (8 / 6))(x, pos)
    assert torch.allclose(ntk, plain, atol=1e-6)


@pytest.mark.parametrize("kwargs, field", [
    (dict(head_dim=7), "head_dim"), (dict(head_dim=8, scaling="yarn"), "rope_scaling"),
    (dict(head_dim=8, factor=0.5), "rope_factor"), (dict(head_dim=8, base=-1.0), "rope_base"),
])
def test_rope_rejects_bad_settings(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RotaryEmbedding(**kwargs)


@pytest.mark.parametrize("positions, buffers", [
    ("rope", {"layers.0.attn.rope.inv_freq": torch.float64}),
    ("sinusoidal", {"embed.pos_emb.table": torch.float32}),
    ("alibi", {"layers.0.attn.alibi_slopes": torch.float32}),
])
@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(),
                                  lambda m: m.to("cpu", torch.bfloat16)])
def test_casting_a_model_keeps_position_buffers_exact(positions, buffers, cast):
    heads = 12 if positions == "alibi" else 2  # 12 heads: slopes 2**-0.5 ... (inexact in bf16)
    model = cast(DecoderLM(TransformerConfig(vocab_size=11, d_model=24, n_layers=1, n_heads=heads,
                                             positions=positions)))
    assert model.lm_head.weight.dtype != torch.float32
    found = dict(model.named_buffers())
    assert {name: found[name].dtype for name in buffers} == buffers
    logits, _ = model(torch.randint(0, 11, (1, 5)))
    assert logits.dtype == model.lm_head.weight.dtype


def test_bf16_model_logits_at_position_4000_match_float32():
    """A bf16-rounded RoPE frequency turns by radians at position 4000: the cast model would
    attend to the wrong keys."""
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, positions="rope")
    model = DecoderLM(cfg).eval()
    with torch.no_grad():  # attention that depends on relative position only, and sharply
        attn = model.layers[0].attn
        attn.qkv_proj.weight[:64].zero_()
        attn.qkv_proj.bias[:64] = 3 * torch.randn(64)
        attn.qkv_proj.weight[64:].mul_(30)
        attn.out_proj.weight.mul_(30)
        idx = torch.randint(0, 50, (1, 4001))
        want = model(idx, last_only=True)[0]
        got = copy.deepcopy(model).to(torch.bfloat16)(idx, last_only=True)[0]
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
