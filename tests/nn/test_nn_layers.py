import pytest
import torch
import torch.nn.functional as F

from qkv.nn import FeedForward, FeedForwardConfig, LayerNorm, RMSNorm


def test_layernorm_matches_torch():
    x = torch.randn(2, 5, 16)
    ln = LayerNorm(16, eps=1e-12)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    ref = F.layer_norm(x, (16,), ln.weight, ln.bias, 1e-12)
    assert torch.allclose(ln(x), ref)
    assert LayerNorm(16, bias=False).bias is None


def test_rmsnorm():
    x = torch.randn(2, 5, 16)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(RMSNorm(16)(x), ref, atol=1e-6)
    assert RMSNorm(16)(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("activation, fn", [
    ("relu", F.relu), ("gelu", F.gelu), ("gelu_tanh", lambda h: F.gelu(h, approximate="tanh")),
])
def test_feed_forward_activations(activation, fn):
    ff = FeedForward(FeedForwardConfig(d_model=8, d_ff=16, activation=activation))
    x = torch.randn(2, 3, 8)
    assert torch.allclose(ff(x), ff.fc_out(fn(ff.fc_in(x))))


def test_feed_forward_swiglu():
    ff = FeedForward(FeedForwardConfig(d_model=8, d_ff=16, activation="swiglu", bias=False))
    x = torch.randn(2, 3, 8)
    assert torch.allclose(ff(x), ff.fc_out(F.silu(ff.fc_gate(x)) * ff.fc_in(x)))
    assert ff.fc_in.bias is None


@pytest.mark.parametrize("kwargs, field", [
    (dict(activation="tanh"), "activation"), (dict(dropout=1.0), "dropout"),
    (dict(d_ff=0), "d_ff"),
])
def test_feed_forward_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FeedForwardConfig(**{"d_model": 8, "d_ff": 16, **kwargs})



@pytest.mark.parametrize(("value", "kwargs", "message"), [
    (0, {"low": 0.0, "low_open": True}, r"lr must be a number > 0, got 0$"),
    (-1, {"low": 0.0}, r"lr must be a number >= 0, got -1$"),
    (2, {"low": 0.0, "high": 1.0}, r"lr must be a number in \[0, 1\), got 2$"),
    ("x", {"low": 0.0, "high": 1.0, "high_open": False}, r"in \[0, 1\], got 'x'$"),
])
def test_check_float_message_reads_naturally(value, kwargs, message):
    from qkv.nn.config import check_float

    with pytest.raises(ValueError, match=message):
        check_float("lr", value, **kwargs)
