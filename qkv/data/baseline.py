"""A byte bigram model, the baseline a Transformer must beat, and bits-per-byte helpers.

Bits per byte is the unit that compares models with different tokenizers: the total
negative log-likelihood of a text in bits, divided by its length in UTF-8 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

BOS = 256  # the context of the first byte of a document


def nats_to_bits_per_byte(mean_nll_nats: float, n_tokens: int, n_bytes: int) -> float:
    """Bits per byte from a token-level mean NLL in nats over `n_tokens` tokens covering
    `n_bytes` bytes of text: mean_nll * n_tokens / (n_bytes * ln 2)."""
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be positive, got {n_bytes}")
    return mean_nll_nats * n_tokens / (n_bytes * math.log(2))


def bits_per_byte(total_nll_nats: float, n_bytes: int) -> float:
    """Bits per byte from a summed NLL in nats over text of `n_bytes` bytes."""
    return nats_to_bits_per_byte(total_nll_nats, 1, n_bytes)


def _as_bytes(texts: Iterable[str | bytes]) -> list[np.ndarray]:
    return [np.frombuffer(t.encode("utf-8") if isinstance(t, str) else t, dtype=np.uint8)
            for t in texts]


def _pairs(docs: list[np.ndarray]) -> np.ndarray:
    """(257, 256) counts of (previous byte or BOS, byte) over the documents."""
    counts = np.zeros(257 * 256, dtype=np.int64)
    for d in docs:
        if len(d) == 0:
            continue
        prev = np.concatenate([[BOS], d[:-1]]).astype(np.int64)
        counts += np.bincount(prev * 256 + d, minlength=257 * 256)
    return counts.reshape(257, 256)


class BigramModel:
    """P(byte | previous byte), with a start context for each document's first byte.

    smoothing="laplace": (c(v, w) + alpha) / (c(v) + 256 alpha).
    smoothing="kneser-ney": interpolated Kneser-Ney with absolute discount d; the lower order is
    the continuation distribution N1+(. w) / N1+(. .), itself interpolated with uniform so that
    every byte has nonzero probability.
    """

    def __init__(self, log_probs: np.ndarray, smoothing: str):
        self.log_probs = log_probs  # (257, 256) natural log P(next | context)
        self.smoothing = smoothing

    @classmethod
    def fit(cls, texts: Iterable[str | bytes], smoothing: str = "kneser-ney", alpha: float = 1.0,
            discount: float = 0.75) -> BigramModel:
        """Count byte pairs within each document of `texts` and smooth them."""
        counts = _pairs(_as_bytes(texts)).astype(np.float64)
        if smoothing == "laplace":
            if alpha <= 0:
                raise ValueError(f"alpha must be positive, got {alpha}")
            probs = (counts + alpha) / (counts.sum(1, keepdims=True) + 256 * alpha)
        elif smoothing == "kneser-ney":
            if not 0 < discount < 1:
                raise ValueError(f"discount must be in (0, 1), got {discount}")
            probs = _kneser_ney(counts, discount)
        else:
            raise ValueError(f"unknown smoothing {smoothing!r}; expected 'laplace' or "
                             f"'kneser-ney'")
        return cls(np.log(probs), smoothing)

    def nll(self, texts: Iterable[str | bytes]) -> tuple[float, int]:
        """(summed NLL in nats, number of bytes) of `texts`, each a document."""
        counts = _pairs(_as_bytes(texts))
        return float(-(counts * self.log_probs).sum()), int(counts.sum())

    def bits_per_byte(self, texts: Iterable[str | bytes]) -> float:
        """Bits per byte of `texts` (e.g. a validation split's documents)."""
        total, n = self.nll(texts)
        return bits_per_byte(total, n)


def _kneser_ney(counts: np.ndarray, d: float) -> np.ndarray:
    """(257, 256) interpolated Kneser-Ney probabilities from bigram counts."""
    seen = counts > 0
    continuation = seen.sum(0).astype(np.float64)  # N1+(. w)
    n_types = continuation.sum()
    if n_types == 0:
        return np.full_like(counts, 1 / 256)
    kinds = (continuation > 0).sum()
    lower = np.maximum(continuation - d, 0) / n_types + d * kinds / n_types / 256  # (256,)
    totals = counts.sum(1, keepdims=True)  # c(v)
    followers = seen.sum(1, keepdims=True)  # N1+(v .)
    safe = np.maximum(totals, 1)
    higher = np.maximum(counts - d, 0) / safe + d * followers / safe * lower
    return np.where(totals > 0, higher, lower)
