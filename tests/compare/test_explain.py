import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn
from scipy.stats import kendalltau

from qkv.compare import Context, Settings, explain
from qkv.compare.importance import (
    AttentionPooled,
    BiLSTMClassifier,
    gradient_input,
    kendall_tau_b,
    leave_one_out,
    shuffle_attention,
    top_k_recovery,
)


class BagOfEmbeddings(nn.Module):
    """logits = W (sum_t e_t) + b: every importance measure has a closed form."""

    def __init__(self, vocab_size=10, d=5, n_classes=3, neutral_id=0):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d, padding_idx=neutral_id)
        self.linear = nn.Linear(d, n_classes)

    def forward(self, idx, labels=None):
        return self.linear(self.embedding(idx).sum(1)), None


class ConstantHidden(AttentionPooled):
    """Every position has the same hidden state, so the pooled vector ignores the weights."""

    def __init__(self, vocab_size=10, d=6):
        super().__init__(d, 2)
        self.embedding = nn.Embedding(vocab_size, d)

    def hidden(self, idx):
        return self.embedding(idx).mean(1, keepdim=True).expand(-1, idx.shape[1], -1)


def test_kendall_tau_b_agrees_with_scipy_with_and_without_ties():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        L = 2 + trial % 29
        continuous = torch.rand(6, L, generator=g, dtype=torch.float64)
        tied = torch.randint(0, 3, (6, L), generator=g).double()
        for x, y in ((continuous, torch.rand(6, L, generator=g, dtype=torch.float64)),
                     (tied, torch.randint(0, 4, (6, L), generator=g).double()),
                     (continuous, tied)):
            ours = kendall_tau_b(x, y, chunk=4)
            expected = [kendalltau(a, b).statistic for a, b in zip(x.numpy(), y.numpy(),
                                                                    strict=True)]
            for got, want in zip(ours.tolist(), expected, strict=True):
                assert (math.isnan(got) and math.isnan(want)) or math.isclose(
                    got, want, rel_tol=1e-12, abs_tol=1e-12)


def test_kendall_tau_b_of_a_constant_row_is_nan_and_bad_shapes_raise():
    x = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]])
    tau = kendall_tau_b(x, torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]))
    assert math.isnan(tau[0]) and tau[1] == -1.0
    with pytest.raises(ValueError, match="x and y"):
        kendall_tau_b(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="L >= 2"):
        kendall_tau_b(torch.zeros(2, 1), torch.zeros(2, 1))


def test_gradient_input_matches_the_hand_computed_linear_model():
    torch.manual_seed(0)
    model = BagOfEmbeddings().double()
    idx = torch.randint(1, 10, (7, 5))
    logits = model(idx)[0]
    weight = model.linear.weight[logits.argmax(-1)]  # (N, d): d logit_pred / d e_t for every t
    expected = (model.embedding(idx) * weight[:, None, :]).sum(-1).abs()
    torch.testing.assert_close(gradient_input(model, idx, batch_size=3), expected.detach())


def test_leave_one_out_matches_the_hand_computed_linear_model():
    torch.manual_seed(1)
    model = BagOfEmbeddings().double()
    idx = torch.randint(1, 10, (4, 6))
    with torch.no_grad():
        emb = model.embedding(idx)  # (N, L, d); the neutral token 0 embeds to zero
        probs = model.linear(emb.sum(1)).softmax(-1)
        pred = probs.argmax(-1)
        dropped = model.linear(emb.sum(1, keepdim=True) - emb).softmax(-1)  # (N, L, C)
        expected = (probs.gather(1, pred[:, None])
                    - dropped.gather(2, pred[:, None, None].expand(4, 6, 1))[..., 0]).abs()
    torch.testing.assert_close(leave_one_out(model, idx, neutral_id=0, batch_size=5), expected)


def test_shuffling_attention_leaves_a_model_that_ignores_it_unchanged():
    torch.manual_seed(2)
    idx = torch.randint(0, 10, (5, 12))
    still = shuffle_attention(ConstantHidden().double(), idx, 10,
                              generator=torch.Generator().manual_seed(0), batch_size=2)
    assert still["tvd"].shape == (5, 10) and still["tvd"].max() < 1e-12
    assert not still["flipped"].any()
    moved = shuffle_attention(BiLSTMClassifier(10, 2, d_model=8, neutral_id=0).double(), idx, 10,
                              generator=torch.Generator().manual_seed(0))
    assert moved["tvd"].max() > 1e-6


def test_top_k_recovery_counts_planted_tokens_among_the_top_k():
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.0], [0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 1.0, 1.0]])
    planted = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    got = top_k_recovery(scores, planted)
    assert got[:2].tolist() == [1.0, 0.5] and math.isnan(got[2])


def test_function_bodies_labels_methods_and_module_functions(tmp_path):
    source = ('def f(x):\n    """Doc."""\n    return x + 1\n\n'
              'class C:\n    def m(self, y):\n        return self.y\n\n'
              '    @staticmethod\n    def s(z):\n        return z\n')
    (tmp_path / "mod.py").write_text(source)
    (tmp_path / "bad.py").write_text("def (:\n")
    found = explain.function_bodies([("mod.py", tmp_path / "mod.py"),
                                     ("bad.py", tmp_path / "bad.py")])
    rows = found["train"] + found["test"]
    assert sorted(rows) == [("return self.y", 1), ("return x + 1", 0)]


def test_run_under_tiny_settings(tmp_path, monkeypatch):
    tiny = dataclasses.replace(explain.QUICK, planted_train=64, planted_test=16, planted_len=8,
                               code_stride=30, code_len=12, code_vocab=300, code_train=64,
                               code_test=16, d_model=8, steps=3, batch=8, shuffles=4)
    monkeypatch.setattr(explain, "QUICK", tiny)
    seen = []
    ctx = Context(Settings(quick=True, seed=3), tmp_path, lambda *a: seen.append(a))
    result = explain.run(ctx)
    assert seen and result.claim and result.anchor and result.findings and result.headline
    assert result.agrees in (True, False)
    assert len(result.tables) == 4 and all(t.startswith("| ") for t in result.tables)
    assert result.figures == ["explain_tau.png", "explain_recovery.png",
                              "explain_permutation.png"]
    assert all((tmp_path / name).stat().st_size > 0 for name in result.figures)
    data = json.loads(json.dumps(result.data))
    for task in ("planted", "code"):
        for model in explain.MODELS:
            got = data["results"][task][model]
            assert 0 <= got["accuracy"] <= 1
            assert len(got["tau"]["gradient_input"]) == data["examples"][task]["test"]
    assert set(data["results"]["planted"]["bilstm"]["recovery"]) == set(explain.MEASURES)
    assert data["seconds"] > 0 and explain.ROW.name == "explain"


def _results(tau: float, *, transformer_tau: float = 0.2, tvd: float = 0.01) -> dict:
    """Per-model results as `study` returns them, with the given mean taus and shuffling TVD."""
    def one(model: str) -> dict:
        mean = tau if model == "bilstm" else transformer_tau
        summary = {"mean": mean, "median": mean, "q25": mean, "q75": mean, "significant": 0.1}
        return {"accuracy": 0.9, "seconds": {"train": 1.0},
                "tau_summary": {p: dict(summary) for p in explain.PAIRS},
                "permutation": {"median_max_attention": 0.3, "median_tvd": tvd,
                                "mean_tvd": tvd, "flipped": 0.0},
                "recovery": {m: 0.5 for m in explain.MEASURES}, "recovery_chance": 0.1}
    return {task: {m: one(m) for m in explain.MODELS} for task in ("planted", "code")}


def test_a_tau_below_the_anchor_range_still_supports_the_claim():
    data = {}
    result = explain.summarise(_results(0.05), data)
    assert result.agrees is True  # weights disagree with the other measures: the claim holds
    assert data["verdicts"] == {"claim": True, "anchor_range": False, "permutation": True}
    assert result.findings.startswith("(a) The claim holds")
    assert "outside Jain & Wallace's 0.1–0.4, below it" in result.findings
    assert "here it does." in data["verdict"] and "both tasks? no" in data["verdict"]


def test_the_claim_verdict_is_separate_from_the_anchor_and_the_permutation_test():
    data = {}
    result = explain.summarise(_results(0.3, tvd=0.2), data)  # in range, but shuffling moves
    assert result.agrees is True
    assert data["verdicts"] == {"claim": True, "anchor_range": True, "permutation": False}
    assert "does move the BiLSTM's output" in result.findings
    assert "below 0.05 on both tasks? no" in data["verdict"]
    data = {}
    result = explain.summarise(_results(0.3, transformer_tau=0.7), data)  # one model agrees
    assert result.agrees is False and data["verdicts"]["claim"] is False
    assert result.findings.startswith("(a) The claim is NOT shown")
    assert "for the Transformer + additive attention on code (mean τ 0.70)" in result.findings
    verdicts = explain.judge(_results(float("nan")))
    assert verdicts["claim"] is False  # an undefined tau does not show the claim
