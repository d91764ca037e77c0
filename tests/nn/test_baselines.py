"""The LSTM and TCN baselines: shapes, loss, causality, gradient flow, the TCN's receptive
field, matched parameter counts, and bad settings."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qkv.nn import (
    IGNORE_INDEX,
    LSTMLM,
    MODEL_KINDS,
    TCNLM,
    DecoderLM,
    LSTMConfig,
    TCNBlock,
    TCNConfig,
    matched_models,
    parameter_counts,
    token_embedding,
)
from qkv.nn.baselines import lstm_num_params, tcn_num_params

V = 11


def _lstm(**overrides):
    return LSTMLM(LSTMConfig(**{"vocab_size": V, "d_model": 16, "n_layers": 2, **overrides}))


def _tcn(**overrides):
    return TCNLM(TCNConfig(**{"vocab_size": V, "d_model": 16, "max_len": 12, **overrides}))


BUILDERS = {"lstm": _lstm, "tcn": _tcn}


@pytest.fixture(params=sorted(BUILDERS))
def baseline(request):
    torch.manual_seed(0)
    return BUILDERS[request.param]


def test_shapes_and_loss_follow_decoder_lm(baseline):
    model = baseline()
    idx = torch.randint(0, V, (3, 9))
    targets = torch.randint(0, V, (3, 9))
    targets[:, :4] = IGNORE_INDEX
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 9, V) and model(idx)[1] is None
    expected = F.cross_entropy(logits.reshape(-1, V), targets.flatten(), ignore_index=IGNORE_INDEX)
    assert torch.allclose(loss, expected)
    with pytest.raises(ValueError, match="targets"):
        model(idx, targets[:, :5])
    with pytest.raises(ValueError, match="idx"):
        model(torch.full((1, 4), V))


def _perturbed(idx: torch.Tensor) -> torch.Tensor:
    """(L + 1, L): row 0 is idx (1, L); row t + 1 is idx with token t changed."""
    L = idx.shape[1]
    rows = idx.repeat(L + 1, 1)
    t = torch.arange(L)
    rows[t + 1, t] = (rows[t + 1, t] + 1) % V
    return rows


def test_causal_every_position_float64(baseline):
    model = baseline().double().eval()
    L = 10
    logits = model(_perturbed(torch.randint(0, V, (1, L))))[0]  # one forward: (L + 1, L, V)
    for t in range(L):
        assert torch.equal(logits[t + 1, :t], logits[0, :t]), f"position {t} leaked backwards"
        assert not torch.equal(logits[t + 1, t], logits[0, t])


def test_every_parameter_gets_a_finite_nonzero_gradient(baseline):
    model = baseline()
    idx = torch.randint(0, V, (4, 12))
    model(idx, torch.randint(0, V, (4, 12)))[1].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        assert float(p.grad.abs().sum()) > 0, name


def test_tcn_receptive_field_by_perturbation():
    torch.manual_seed(1)
    config = TCNConfig(vocab_size=V, d_model=32, kernel_size=2, n_blocks=2)
    rf = config.receptive_field
    assert rf == 1 + 2 * 1 * (1 + 2) == 7
    model = TCNLM(config).double().eval()
    L = 16
    t = L - 1
    out = model(_perturbed(torch.randint(0, V, (1, L))))[0][:, t]  # (L + 1, V) at position t
    moved = [not torch.equal(out[s + 1], out[0]) for s in range(L)]
    assert moved[t - rf + 1] and all(moved[t - rf + 1:])
    assert not any(moved[:t - rf + 1])


def test_tcn_depth_covers_max_len():
    for kernel_size in (2, 3, 5):
        for max_len in (1, 7, 8, 100, 1024):
            config = TCNConfig(vocab_size=V, kernel_size=kernel_size, max_len=max_len)
            assert config.receptive_field >= max_len
            shallower = TCNConfig(vocab_size=V, kernel_size=kernel_size,
                                  n_blocks=max(1, config.depth - 1))
            assert config.depth == 1 or shallower.receptive_field < max_len
    assert TCNConfig(vocab_size=V, kernel_size=3, max_len=1024).depth == 9


def test_tcn_block_keeps_shape_and_dilation_padding():
    block = TCNBlock(8, kernel_size=3, dilation=4)
    assert block.pad == 8
    assert block(torch.randn(2, 5, 8)).shape == (2, 5, 8)


def test_sequential_steps():
    assert _lstm().sequential_steps(300) == 300
    tcn = _tcn(max_len=1024, kernel_size=3)
    assert tcn.sequential_steps(300) == tcn.config.depth == 9


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_count_formulas_match_the_built_models(tie):
    for d, n in ((5, 1), (16, 3)):
        model = _lstm(d_model=d, n_layers=n, tie_embeddings=tie)
        assert model.num_params() == lstm_num_params(model.config)
        model = _tcn(d_model=d, kernel_size=n + 1, tie_embeddings=tie)
        assert model.num_params() == tcn_num_params(model.config)
    for model in (_lstm(tie_embeddings=tie), _tcn(tie_embeddings=tie)):
        assert (model.lm_head.weight is model.tok_emb.weight) == tie


@pytest.mark.parametrize("vocab, d_model, n_layers, seq_len", [
    (16, 64, 2, 256), (256, 64, 2, 256), (300, 128, 4, 1024), (8, 32, 1, 64)])
def test_matched_models_within_five_percent(vocab, d_model, n_layers, seq_len):
    models = matched_models(vocab, d_model=d_model, n_layers=n_layers, n_heads=4,
                            seq_len=seq_len)
    assert tuple(models) == MODEL_KINDS
    counts = parameter_counts(models)
    target = counts["transformer"]
    assert isinstance(models["transformer"], DecoderLM) and target == \
        models["transformer"].num_params()
    for kind in ("lstm", "tcn"):
        assert abs(counts[kind] - target) <= 0.05 * target, (kind, counts)
    assert models["lstm"].config.n_layers == n_layers
    assert models["tcn"].config.receptive_field >= seq_len
    for model in models.values():
        assert model.lm_head.weight is token_embedding(model).weight  # tied


def test_matched_models_without_transformer_layers_uses_one_lstm_layer():
    models = matched_models(16, d_model=32, n_layers=0, n_heads=4, seq_len=64)
    assert models["lstm"].config.n_layers == 1


def test_matched_models_impossible_tolerance_names_d_model():
    with pytest.raises(ValueError, match="^d_model"):
        matched_models(16, d_model=32, n_layers=2, n_heads=4, seq_len=64, tolerance=1e-9)


def test_token_embedding_of_all_three():
    models = matched_models(V, d_model=16, n_layers=1, n_heads=2, seq_len=16)
    for kind, model in models.items():
        emb = token_embedding(model)
        assert isinstance(emb, nn.Embedding) and emb.num_embeddings == V, kind
    assert token_embedding(models["transformer"]) is models["transformer"].embed.tok_emb
    with pytest.raises(ValueError, match="^model"):
        token_embedding(nn.Linear(2, 2))


@pytest.mark.parametrize("make, field", [
    (lambda: LSTMConfig(vocab_size=0), "vocab_size"),
    (lambda: LSTMConfig(vocab_size=V, d_model=0), "d_model"),
    (lambda: LSTMConfig(vocab_size=V, n_layers=0), "n_layers"),
    (lambda: LSTMConfig(vocab_size=V, dropout=1.0), "dropout"),
    (lambda: LSTMConfig(vocab_size=V, tie_embeddings="yes"), "tie_embeddings"),
    (lambda: LSTMConfig.from_dict({"vocab_size": V, "hidden": 3}), "LSTMConfig has no field"),
    (lambda: TCNConfig(vocab_size=V, kernel_size=1), "kernel_size"),
    (lambda: TCNConfig(vocab_size=V, n_blocks=0), "n_blocks"),
    (lambda: TCNConfig(vocab_size=V, max_len=0), "max_len"),
    (lambda: TCNConfig(vocab_size=V, dropout=-0.1), "dropout"),
    (lambda: TCNConfig.from_dict({"vocab_size": V, "layers": 3}), "TCNConfig has no field"),
    (lambda: TCNBlock(8, kernel_size=3, dilation=0), "dilation"),
    (lambda: matched_models(V, d_model=16, n_layers=1, n_heads=2, seq_len=16, tolerance=0),
     "tolerance"),
    (lambda: matched_models(V, d_model=16, n_layers=1, n_heads=0, seq_len=16), "n_heads"),
    (lambda: _lstm().sequential_steps(0), "seq_len"),
])
def test_bad_settings_raise_naming_the_field(make, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        make()
