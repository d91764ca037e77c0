"""The byte bigram baseline and bits-per-byte helpers."""

import math

import numpy as np
import pytest

from qkv.data import BigramModel, Corpus, bits_per_byte, nats_to_bits_per_byte


@pytest.fixture(scope="module")
def corpus():
    return Corpus.load("stdlib", max_bytes=600_000)


def test_bits_per_byte_helpers():
    # A uniform byte model: ln 256 nats per byte token, one token per byte -> 8 bits per byte.
    assert nats_to_bits_per_byte(math.log(256), 1000, 1000) == pytest.approx(8.0)
    # Tokens of 4 bytes each at ln 256 nats per token -> 2 bits per byte.
    assert nats_to_bits_per_byte(math.log(256), 250, 1000) == pytest.approx(2.0)
    assert bits_per_byte(1000 * math.log(2), 1000) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        nats_to_bits_per_byte(1.0, 1, 0)


@pytest.mark.parametrize("smoothing", ["laplace", "kneser-ney"])
def test_distributions_are_proper(corpus, smoothing):
    model = BigramModel.fit(corpus.texts("train"), smoothing=smoothing)
    probs = np.exp(model.log_probs)
    assert probs.shape == (257, 256)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-9)
    assert (probs > 0).all()


@pytest.mark.parametrize("smoothing", ["laplace", "kneser-ney"])
def test_bigram_on_stdlib(corpus, smoothing):
    model = BigramModel.fit(corpus.texts("train"), smoothing=smoothing)
    val = model.bits_per_byte(corpus.texts("validation"))
    assert 2.5 < val < 4.5  # far below 8 (uniform) and above what context-rich models reach
    assert model.bits_per_byte(corpus.texts("train")) < val + 0.3
    total, n = model.nll(corpus.texts("validation"))
    assert n == sum(len(t.encode()) for t in corpus.texts("validation"))
    assert val == pytest.approx(total / n / math.log(2))


def test_bigram_simple_cases():
    model = BigramModel.fit(["abababab"] * 50, smoothing="laplace", alpha=0.01)
    assert model.bits_per_byte(["abab"]) < 0.5
    assert model.bits_per_byte([b"\x00\xff"]) > 10
    uniform = BigramModel.fit([bytes(range(256)) * 40], smoothing="laplace")
    assert 7 < uniform.bits_per_byte([bytes(np.random.default_rng(0).integers(0, 256, 5000,
                                                                              dtype=np.uint8))]) < 9
    assert BigramModel.fit([]).bits_per_byte(["xyz"]) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="unknown smoothing"):
        BigramModel.fit(["a"], smoothing="witten-bell")
