"""Rows `code` and `position`: the permutation check, the per-position loss, and tiny runs."""

import json

import pytest
import torch
import torch.nn.functional as F

from qkv.compare import Context, RowResult, Settings, code, position
from qkv.data import LMWindows
from qkv.nn import DecoderLM, Encoder, TransformerConfig
from qkv.train.evaluate import evaluate


def _encoder(positions: str) -> Encoder:
    torch.manual_seed(0)
    return Encoder(TransformerConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4,
                                     max_len=16, positions=positions))


def _inputs_and_perm():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 32, (3, 16), generator=g), torch.randperm(16, generator=g)


def test_without_positions_attention_is_permutation_equivariant():
    idx, perm = _inputs_and_perm()
    assert position.permutation_difference(_encoder("none"), idx, perm) <= 1e-6


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "rope", "alibi"])
def test_with_positions_the_permutation_check_fails(positions):
    idx, perm = _inputs_and_perm()
    assert position.permutation_difference(_encoder(positions), idx, perm) > 1e-4


def test_permutation_difference_rejects_a_non_permutation():
    idx, _ = _inputs_and_perm()
    with pytest.raises(ValueError, match="perm must be a permutation"):
        position.permutation_difference(_encoder("none"), idx, torch.zeros(16, dtype=torch.long))


def test_position_losses_match_a_direct_computation():
    torch.manual_seed(0)
    model = DecoderLM(TransformerConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2,
                                        max_len=12))
    windows = LMWindows(torch.randint(0, 50, (12 * 7 + 1,)), 12)  # 7 windows
    got = code.position_losses(model, windows, batch_size=3)
    direct = torch.zeros(12, dtype=torch.float64)
    for i in range(len(windows)):
        x, y = windows[i]
        with torch.no_grad():
            logits = model(x[None])[0][0].double()  # (L, V)
        direct += torch.stack([F.cross_entropy(logits[t], y[t]) for t in range(12)])
    torch.testing.assert_close(got, direct / len(windows), rtol=1e-5, atol=1e-6)
    overall = evaluate(model, windows, torch.ones(50, dtype=torch.long), batch_size=4)["loss"]
    assert got.mean().item() == pytest.approx(overall, rel=1e-5)
    first_two = code.window_losses(model, windows, max_windows=2)
    assert first_two.shape == (2, 12)
    torch.testing.assert_close(first_two.mean(0), code.position_losses(model, windows,
                                                                       max_windows=2))


def test_spans_span_mean_and_span_drop():
    assert code.spans(512) == [(1, 8), (64, 128), (448, 512)]
    assert code.span_mean([1.0, 2.0, 3.0, 4.0], 2, 3) == 2.5
    losses = torch.tensor([[3.0, 3.0, 1.0, 2.0], [4.0, 4.0, 1.0, 1.0]], dtype=torch.float64)
    drop, se, units = code.span_drop(losses, (1, 2), (3, 4))  # per-window drops 1.5 and 3
    assert drop == pytest.approx(2.25) and units == 2
    assert se == pytest.approx(torch.tensor([1.5, 3.0]).std().item() / 2 ** 0.5)


def test_span_drop_clusters_the_windows_of_one_file():
    # Windows 0-3 in file 0 drop by 1, windows 4-7 in file 1 by 3: two independent units,
    # not eight.
    drops = torch.tensor([1.0] * 4 + [3.0] * 4, dtype=torch.float64)
    losses = torch.stack([drops, torch.zeros(8, dtype=torch.float64)], 1)  # (8, 2)
    files = torch.tensor([0, 0, 0, 0, 5, 5, 5, 5])
    drop, se, units = code.span_drop(losses, (1, 1), (2, 2), files)
    assert drop == pytest.approx(2.0) and units == 2
    # Cluster-robust: sqrt(G / (G - 1) * sum_g (sum_i (d_i - mean))^2) / N = sqrt(2 * 32) / 8.
    assert se == pytest.approx(1.0)
    assert se > 2 * code.span_drop(losses, (1, 1), (2, 2))[1]  # the per-window SE is too small
    # One file per window gives the usual standard error.
    alone = code.span_drop(losses, (1, 1), (2, 2), torch.arange(8))
    assert alone[1] == pytest.approx(drops.std().item() / 8 ** 0.5) and alone[2] == 8
    with pytest.raises(ValueError, match="files must give one file per window"):
        code.span_drop(losses, (1, 1), (2, 2), torch.arange(3))


def test_moving_average_is_the_one_both_rows_use():
    assert code.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert code.moving_average([2.0, 4.0], 5) == [2.0, 3.0]
    assert code.moving_average([], 3) == []
    assert position.moving_average is code.moving_average
    assert not hasattr(code, "_smooth") and not hasattr(position, "_smooth")
    with pytest.raises(ValueError, match="window must be at least 1"):
        code.moving_average([1.0], 0)


def test_window_files_and_first_windows():
    eos = 9
    tokens = torch.tensor([1, 2, 3, eos, 4, 5, eos, 6, 7, 8, 1, 2, eos])  # 3 files, 13 tokens
    windows = LMWindows(tokens, 3)  # starts 0, 3, 6, 9 (4 windows)
    assert code.window_files(windows, eos).tolist() == [0, 0, 1, 2]
    for n in (1, 3):
        first = code.first_windows(windows, n)
        assert len(first) == n
        assert all(torch.equal(first[i][1], windows[i][1]) for i in range(n))
    assert code.first_windows(windows, None) is windows
    assert len(code.first_windows(windows, 99)) == 4
    with pytest.raises(ValueError, match="n must be a positive"):
        code.first_windows(windows, 0)


def _check_result(result: RowResult, out) -> None:
    assert isinstance(result, RowResult)
    for text in (result.claim, result.anchor, result.findings, result.headline):
        assert isinstance(text, str) and text
    assert result.agrees in (True, False, None)
    assert result.tables and all(t.startswith("| ") for t in result.tables)
    assert result.figures and all((out / name).stat().st_size > 0 for name in result.figures)
    json.dumps(result.data)


@pytest.mark.slow  # tokenizes part of the stdlib corpus and trains three models
def test_code_row_runs_on_tiny_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(code, "QUICK", code.Sizes(
        max_bytes=60_000, vocab_size=300, seq_len=16, d_model=32, n_layers=1, n_heads=2,
        steps=2, batch_size=2, test_windows=5, eval_batch=4))  # exactly 5, not 2 batches of 4
    result = code.ROW.run(Context(Settings(quick=True), tmp_path))
    _check_result(result, tmp_path)
    models = result.data["models"]
    assert set(models) == {"transformer", "lstm", "tcn"}
    assert all(len(m["position_loss"]) == 16 and len(m["train_losses"]) == 2
               and m["test_windows"] == 5 and m["test_tokens"] == 5 * 16
               and m["test_files"] >= 1 for m in models.values())
    assert code.ROW.name == "code" and code.ROW.title == "Real code"


def test_position_row_runs_on_tiny_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(position, "SCHEMES", ("none", "learned", "alibi"))
    monkeypatch.setattr(position, "QUICK", position.Sizes(
        enc_len=8, enc_steps=2, enc_batch=4, seq_len=8, d_model=16, n_layers=1, n_heads=2,
        steps=2, batch_size=4, n_test=8))
    result = position.ROW.run(Context(Settings(quick=True), tmp_path))
    _check_result(result, tmp_path)
    eq = result.data["equivariance"]
    assert eq["none"]["difference"] <= 1e-6 < eq["learned"]["difference"]
    ex = result.data["extrapolation"]
    assert ex["lengths"] == [8, 16, 32]
    assert all(len(ex["schemes"][s]["accuracy"]) == 3 for s in position.SCHEMES)
    assert position.ROW.name == "position" and position.ROW.title == "Position matters"
