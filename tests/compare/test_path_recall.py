import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qkv.compare import Context, Settings, load_row
from qkv.compare import path as path_row
from qkv.compare import recall as recall_row
from qkv.compare.path import ModelSize, PathSizes, decay, gradient_by_distance, recall_part
from qkv.compare.recall import RecallSizes
from qkv.data.tasks import copy_memory
from qkv.nn import IGNORE_INDEX, DecoderLM, TransformerConfig
from qkv.nn.baselines import LSTMLM, TCNLM, LSTMConfig, TCNConfig


class _Shifted(nn.Module):
    """logits[:, t] = W x[:, t - shift] (zero for t < shift): the answer is known exactly."""

    def __init__(self, vocab_size: int, d_model: int, shift: int):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.shift = shift

    def forward(self, idx, targets=None):
        x = self.tok_emb(idx)  # (B, L, d)
        x = F.pad(x, (0, 0, self.shift, 0))[:, :idx.shape[1]]
        return self.head(x), None


def test_gradient_by_distance_is_the_weight_norm_at_the_shift_and_zero_elsewhere():
    torch.manual_seed(0)
    model = _Shifted(vocab_size=7, d_model=5, shift=3)
    norms = gradient_by_distance(model, torch.randint(0, 7, (4, 9)), embedding=model.tok_emb)
    expected = torch.zeros(9, dtype=torch.float64)
    expected[3] = model.head.weight.double().norm()
    assert norms.dtype == torch.float64 and norms.shape == (9,)
    torch.testing.assert_close(norms, expected, rtol=1e-12, atol=0.0)


def test_gradient_by_distance_matches_the_jacobian_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = LSTMLM(LSTMConfig(vocab_size=6, d_model=8, n_layers=2)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 6, (3, 12))
    norms = gradient_by_distance(model, idx)
    reference = model.double()
    per_example = []
    for b in range(3):
        x = reference.tok_emb(idx[b:b + 1]).detach()
        jac = torch.autograd.functional.jacobian(
            lambda e: reference.lm_head(reference.body(e))[0, -1], x)  # (V, 1, L, d)
        per_example.append(jac.pow(2).sum(dim=(0, 1, 3)).sqrt().flip(0))
    torch.testing.assert_close(norms, torch.stack(per_example).mean(0), rtol=1e-10, atol=0.0)
    assert all(torch.equal(before[k], v.float()) for k, v in model.state_dict().items())


def test_lstm_gradient_is_nonzero_at_every_distance_and_fades():
    torch.manual_seed(0)
    model = LSTMLM(LSTMConfig(vocab_size=10, d_model=16, n_layers=2))
    norms = gradient_by_distance(model, torch.randint(0, 10, (2, 40)))
    assert bool((norms > 0).all())
    assert norms[-1] < 1e-3 * norms[1]


def test_tcn_gradient_is_exactly_zero_beyond_the_receptive_field():
    torch.manual_seed(0)
    config = TCNConfig(vocab_size=10, d_model=8, n_blocks=2)
    field = config.receptive_field  # 13 tokens: the output and the 12 before it
    norms = gradient_by_distance(TCNLM(config), torch.randint(0, 10, (4, 30)))
    assert bool((norms[:field] > 0).all())
    assert bool((norms[field:] == 0).all())


def test_transformer_gradient_does_not_fade():
    torch.manual_seed(0)
    model = DecoderLM(TransformerConfig(vocab_size=10, d_model=16, n_layers=1, n_heads=2,
                                        max_len=64, positions="rope"))
    norms = gradient_by_distance(model, torch.randint(0, 10, (2, 64)))
    assert bool((norms > 0).all()) and norms[-1] > 0.1 * norms[1]


def test_gradient_by_distance_refuses_bad_input():
    model = _Shifted(5, 3, 1)
    with pytest.raises(ValueError, match="inputs"):
        gradient_by_distance(model, torch.zeros(4, dtype=torch.long), embedding=model.tok_emb)
    with pytest.raises(ValueError, match="embedding"):
        gradient_by_distance(model, torch.zeros(1, 4, dtype=torch.long),
                             embedding=nn.Embedding(5, 3))


def test_recall_part_scores_only_the_symbols_and_decay_reads_their_distances():
    data = copy_memory(3, 5, seed=0)
    part = recall_part(data)
    assert bool((part.targets[:, :-10] == IGNORE_INDEX).all())
    assert torch.equal(part.targets[:, -10:], data.inputs[:, :10])
    norms = [float(k) for k in range(25)]  # T=5: L=25, the symbols at distances 15..24
    d = decay(norms, 5)
    assert d["k=0"] == 0 and d["k=1"] == 1 and d["k=100"] is None
    assert d["symbols"] == 19.5 and d["symbols/k=1"] == 19.5


def test_recall_cells_keep_only_those_that_fit():
    sizes = RecallSizes(seq_lens=(16, 64), pairs=(2, 8), mqar_vocab=32, mqar_steps=1,
                        induction_len=8, induction_vocab=8, induction_steps=1, batch=2, test=2,
                        lr=1e-3, model=ModelSize())
    assert sizes.cells() == [(16, 2), (64, 2), (64, 8)]


TINY_MODEL = ModelSize(d_model=16, n_layers=1, n_heads=2)


class _Unsaved(Context):
    """A context that draws but does not write figures (saves time in a repeated run)."""

    def save_figure(self, fig, name: str) -> str:
        import matplotlib.pyplot as plt

        plt.close(fig)
        return name


def _run(name: str, out, calls: list, context=Context):
    progress = lambda *args: calls.append(args)  # noqa: E731
    return load_row(name).run(context(Settings(quick=True, seed=3), out, progress=progress))


def _check(result, out, figures: int):
    for text in (result.claim, result.anchor, result.findings, result.headline):
        assert isinstance(text, str) and text
    assert result.agrees in (True, False, None)
    assert result.tables and all(t.startswith("| ") for t in result.tables)
    assert len(result.figures) == figures
    assert all((out / name).stat().st_size > 0 for name in result.figures)
    json.dumps(result.data, allow_nan=False)


def _last_count(calls: list) -> tuple:
    """(completed, total) of the last progress call that counted steps."""
    return [args[1:] for args in calls if args[1] is not None][-1]


def _without_seconds(value):
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if k != "seconds"}
    return value


def test_path_row_runs_small_and_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setattr(path_row, "QUICK", PathSizes(lengths=(4, 6), steps=(2, 3), batch=4,
                                                     test=8, probe=2, lr=1e-3, model=TINY_MODEL))
    calls = []
    first = _run("path", tmp_path / "a", calls)
    _check(first, tmp_path / "a", figures=3)
    assert _last_count(calls) == (3 * 5, 3 * 5)
    runs = first.data["runs"]
    assert set(runs) == {"4", "6"}
    grads = runs["6"]["models"]["lstm"]
    assert len(grads["grad_init"]) == len(grads["grad_trained"]) == 6 + 20
    assert "grad_init" not in runs["4"]["models"]["lstm"] and len(grads["train_loss"]) == 3
    assert math.isclose(runs["6"]["no_memory_loss"], 10 * math.log(8) / 26)
    second = _run("path", tmp_path / "b", [], context=_Unsaved)
    assert _without_seconds(first.data) == _without_seconds(second.data)


def test_recall_row_runs_small(tmp_path, monkeypatch):
    monkeypatch.setattr(recall_row, "QUICK", RecallSizes(
        seq_lens=(8, 16), pairs=(2,), mqar_vocab=16, mqar_steps=2, induction_len=8,
        induction_vocab=8, induction_steps=2, batch=4, test=8, lr=1e-3, model=TINY_MODEL))
    calls = []
    result = _run("recall", tmp_path, calls)
    _check(result, tmp_path, figures=2)
    assert _last_count(calls) == (3 * 4, 3 * 4)
    mqar = result.data["runs"]["mqar"]
    assert set(mqar["lstm"]["cells"]) == {"L=8,P=2", "L=16,P=2"}
    assert 0 <= result.data["runs"]["induction"]["tcn"]["accuracy"] <= 1
