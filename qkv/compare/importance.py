"""Attention-pooled classifiers and the token importance measures of the `explain` row.

Both classifiers end in the same head, the additive attention of Bahdanau et al. (2015) as Jain
& Wallace (2019) use it for text classification: over the encoder's hidden states h_t (B, L, d),

    score_t = v . tanh(W h_t + b),   alpha = softmax_t(score),   logits = U (sum_t alpha_t h_t) + c

so every example has one explicit attention weight per token, and shuffling alpha changes the
pooled vector while the hidden states stay put. The encoders differ: a one-layer BiLSTM (Jain &
Wallace's setting) or a qkv Transformer `Encoder`.

Importance measures, each (N, L) with larger meaning more important:
- `attention_weights`: alpha;
- `gradient_input`: |sum_d (d logit_pred / d e_t)_d (e_t)_d|, with e_t the token embedding (for
  the Transformer, before positions are added) and logit_pred the predicted class's logit;
- `leave_one_out`: |p_pred(x) - p_pred(x with token t replaced by a neutral token)|, which for
  two classes is the total variation distance Jain & Wallace use.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qkv.nn import Encoder, TransformerConfig


class AdditiveAttention(nn.Module):
    """Bahdanau's additive attention without a query: hidden (B, L, d) -> weights (B, L)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.proj = nn.Linear(d_model, d_model)
        self.score = nn.Linear(d_model, 1, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(torch.tanh(self.proj(hidden))).squeeze(-1).softmax(-1)


class AttentionPooled(nn.Module):
    """An encoder's hidden states, pooled by additive attention, then a linear classifier.

    Subclasses define `embedding` (the token nn.Embedding) and `hidden(idx)` -> (B, L, d).
    `forward(idx, labels=None)` returns (logits (B, C), mean cross-entropy or None), so
    `qkv.compare.fit` trains it with (inputs, labels) batches.
    """

    embedding: nn.Embedding

    def __init__(self, d_model: int, n_classes: int):
        super().__init__()
        self.pool = AdditiveAttention(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def classify(self, hidden: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, d) pooled with alpha (B, L) -> logits (B, C), or with S weightings per
        example alpha (B, S, L) -> logits (B, S, C)."""
        if alpha.dim() == 2:
            return self.head(torch.bmm(alpha.unsqueeze(1), hidden).squeeze(1))
        return self.head(torch.bmm(alpha, hidden))

    def forward(self, idx: torch.Tensor, labels: torch.Tensor | None = None):
        hidden = self.hidden(idx)
        logits = self.classify(hidden, self.pool(hidden))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return logits, loss


class BiLSTMClassifier(AttentionPooled):
    """Jain & Wallace's encoder: token embeddings, one BiLSTM layer (d_model/2 per direction)."""

    def __init__(self, vocab_size: int, n_classes: int, *, d_model: int, neutral_id: int):
        super().__init__(d_model, n_classes)
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=neutral_id)
        self.lstm = nn.LSTM(d_model, d_model // 2, batch_first=True, bidirectional=True)

    def hidden(self, idx):
        return self.lstm(self.embedding(idx))[0]  # (B, L, d_model)


class TransformerClassifier(AttentionPooled):
    """A qkv `Encoder` (learned positions, pre-norm) under the same attention-pooling head."""

    def __init__(self, vocab_size: int, n_classes: int, *, d_model: int, n_layers: int,
                 n_heads: int, max_len: int, neutral_id: int):
        super().__init__(d_model, n_classes)
        self.encoder = Encoder(TransformerConfig(vocab_size=vocab_size, d_model=d_model,
                                                 n_layers=n_layers, n_heads=n_heads,
                                                 max_len=max_len))
        self.embedding = self.encoder.embed.tok_emb
        with torch.no_grad():  # the neutral token never occurs in training: it stays zero
            self.embedding.weight[neutral_id].zero_()

    def hidden(self, idx):
        return self.encoder(idx)  # (B, L, d_model)


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@torch.no_grad()
def predict(model: AttentionPooled, idx: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Class probabilities (N, C) in float64."""
    return torch.cat([model(idx[s])[0].double().softmax(-1) for s in _batches(len(idx),
                                                                             batch_size)])


@torch.no_grad()
def attention_weights(model: AttentionPooled, idx: torch.Tensor,
                      batch_size: int = 256) -> torch.Tensor:
    """The pooling head's weights alpha (N, L), float64."""
    return torch.cat([model.pool(model.hidden(idx[s])).double()
                      for s in _batches(len(idx), batch_size)])


def gradient_input(model: nn.Module, idx: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """|sum over the embedding dimension of grad * embedding| (N, L), float64, where grad is the
    gradient of each example's predicted-class logit w.r.t. its token embeddings.

    `model(idx)[0]` must give logits (B, C) and `model.embedding` be the token nn.Embedding.
    """
    captured = []
    handle = model.embedding.register_forward_hook(lambda m, i, out: captured.append(out))
    try:
        parts = []
        for s in _batches(len(idx), batch_size):
            captured.clear()
            with torch.enable_grad():
                logits = model(idx[s])[0]
                picked = logits.gather(1, logits.argmax(-1, keepdim=True)).sum()
                grad, = torch.autograd.grad(picked, captured[0])
            parts.append((grad.double() * captured[0].detach().double()).sum(-1).abs())
    finally:
        handle.remove()
    return torch.cat(parts)


@torch.no_grad()
def leave_one_out(model: nn.Module, idx: torch.Tensor, neutral_id: int,
                  batch_size: int = 1024) -> torch.Tensor:
    """|p_pred(x) - p_pred(x with token t replaced by neutral_id)| for every t: (N, L) float64,
    where p_pred is the probability of the class predicted for the unchanged x."""
    N, L = idx.shape
    probs = predict(model, idx)  # (N, C)
    pred = probs.argmax(-1)
    base = probs.gather(1, pred[:, None])  # (N, 1)
    variants = idx[:, None, :].repeat(1, L, 1)  # (N, L, L): variant t drops token t
    variants[:, torch.arange(L), torch.arange(L)] = neutral_id
    flat = predict(model, variants.reshape(N * L, L), batch_size).reshape(N, L, -1)
    return (base - flat.gather(2, pred[:, None, None].expand(N, L, 1))[..., 0]).abs()


@torch.no_grad()
def shuffle_attention(model: AttentionPooled, idx: torch.Tensor, n_shuffles: int, *,
                      generator: torch.Generator, batch_size: int = 256) -> dict:
    """Jain & Wallace's permutation test: shuffle each example's attention weights over its
    tokens (hidden states and everything else unchanged) `n_shuffles` times.

    Returns {"tvd": (N, S) total variation distance between the shuffled and the original
    predicted distributions, "flipped": (N, S) bool, the predicted class changed}.
    """
    tvds, flips = [], []
    for s in _batches(len(idx), batch_size):
        hidden = model.hidden(idx[s])  # (B, L, d)
        alpha = model.pool(hidden)  # (B, L)
        B, L = alpha.shape
        probs = model.classify(hidden, alpha).double().softmax(-1)  # (B, C)
        order = torch.rand(B, n_shuffles, L, generator=generator).argsort(-1)
        shuffled = alpha[:, None, :].expand(B, n_shuffles, L).gather(2, order)  # (B, S, L)
        moved = model.classify(hidden, shuffled).double().softmax(-1)  # (B, S, C)
        tvds.append(0.5 * (moved - probs[:, None]).abs().sum(-1))
        flips.append(moved.argmax(-1) != probs.argmax(-1)[:, None])
    return {"tvd": torch.cat(tvds), "flipped": torch.cat(flips)}


def kendall_tau_b(x: torch.Tensor, y: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Kendall's tau-b between x[i] and y[i] for each row i: x, y (N, L) -> (N,) float64.

    tau_b = sum_{j<k} s(x_j - x_k) s(y_j - y_k) / sqrt(pairs untied in x * pairs untied in y),
    with s the sign; nan where x[i] or y[i] is constant (as scipy.stats.kendalltau). Raises
    ValueError unless x and y are (N, L) of the same shape with L >= 2.
    """
    if x.shape != y.shape or x.dim() != 2 or x.shape[1] < 2:
        raise ValueError(f"x and y must both be (N, L) with L >= 2, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    taus = []
    for s in _batches(x.shape[0], chunk):
        a, b = x[s].double(), y[s].double()
        sa = torch.sign(a[:, :, None] - a[:, None, :])  # (n, L, L)
        sb = torch.sign(b[:, :, None] - b[:, None, :])
        denominator = (sa.abs().sum((1, 2)) * sb.abs().sum((1, 2))).sqrt()
        taus.append((sa * sb).sum((1, 2)) / denominator)  # 0/0 -> nan, as scipy
    return torch.cat(taus)


def tau_summary(taus: torch.Tensor, pvalues: list[float]) -> dict:
    """Mean, median, quartiles of per-example tau (nan rows left out) and the fraction of all
    examples whose tau is significant at p < 0.05."""
    valid = taus[~taus.isnan()]
    q = [float("nan")] * 3
    if len(valid):
        q = torch.quantile(valid, torch.tensor([0.25, 0.5, 0.75], dtype=valid.dtype)).tolist()
    return {"mean": valid.mean().item(), "median": q[1], "q25": q[0], "q75": q[2],
            "significant": sum(p < 0.05 for p in pvalues) / len(pvalues),
            "undefined": int(taus.isnan().sum()), "n": len(pvalues)}


def kendall_pvalues(x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """scipy.stats.kendalltau's two-sided p-value for each row pair of x, y (N, L)."""
    from scipy.stats import kendalltau

    return [float(kendalltau(a, b).pvalue) for a, b in zip(x.numpy(), y.numpy(), strict=True)]


def top_k_recovery(scores: torch.Tensor, planted: torch.Tensor) -> torch.Tensor:
    """Per example (N,): the fraction of the k highest-scoring tokens that are planted, with
    k = the number of planted tokens of that example (rows with none are nan)."""
    k = planted.sum(1)
    ranks = scores.double().argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # 0 = top
    hits = (planted & (ranks < k[:, None])).sum(1)
    return torch.where(k > 0, hits / k.clamp(min=1), torch.nan).double()
