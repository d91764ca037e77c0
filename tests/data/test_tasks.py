"""The synthetic tasks: layouts, scoring, determinism, the no-memory loss, and bad arguments."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.data import (
    PlantedData,
    TaskData,
    copy_memory,
    induction,
    mqar,
    no_memory_loss,
    planted_keyword,
)
from qkv.data.tasks import PLANTED_SET_SIZE
from qkv.nn import IGNORE_INDEX


def test_copy_memory_tcn_layout_exactly():
    T, length = 7, 10
    data = copy_memory(5, T, seed=0)
    x, y = data.inputs, data.targets
    assert data.vocab_size == 10 and len(data) == 5
    assert x.shape == y.shape == (5, T + 20) and x.dtype == y.dtype == torch.long
    symbols = x[:, :length]
    assert bool(((symbols >= 1) & (symbols <= 8)).all())
    assert bool((x[:, length:length + T - 1] == 0).all())  # T - 1 blanks
    assert bool((x[:, T + length - 1:] == 9).all())  # the last 11 entries are the delimiter
    assert bool((y[:, :T + length] == 0).all())  # blanks to predict, all scored
    assert torch.equal(y[:, T + length:], symbols)


def test_copy_memory_arjovsky_layout_exactly():
    T, length = 5, 3
    data = copy_memory(4, T, seed=1, n_symbols=4, length=length, layout="arjovsky")
    x, y = data.inputs, data.targets
    assert data.vocab_size == 6 and x.shape == (4, T + 2 * length)
    assert bool(((x[:, :length] >= 1) & (x[:, :length] <= 4)).all())
    assert bool((x[:, length:T + length - 1] == 0).all())
    assert bool((x[:, T + length - 1] == 5).all())  # one delimiter, then blanks
    assert bool((x[:, T + length:] == 0).all())
    assert bool((y[:, :T + length] == 0).all())
    assert torch.equal(y[:, T + length:], x[:, :length])


@pytest.mark.parametrize("T, n_symbols, length", [(1, 8, 10), (30, 8, 10), (1000, 8, 10),
                                                  (12, 3, 4)])
def test_no_memory_loss_is_the_loss_of_a_uniform_guess(T, n_symbols, length):
    data = copy_memory(3, T, seed=2, n_symbols=n_symbols, length=length)
    N, L = data.inputs.shape
    V = data.vocab_size
    logits = torch.full((N, L, V), -math.inf, dtype=torch.float64)
    logits[:, :T + length, 0] = 0.0  # blanks predicted with probability one
    logits[:, T + length:, 1:n_symbols + 1] = 0.0  # uniform over the symbols at the end
    loss = F.cross_entropy(logits.reshape(-1, V), data.targets.flatten())
    assert abs(loss.item() - no_memory_loss(T, n_symbols=n_symbols, length=length)) < 1e-6
    assert no_memory_loss(T, n_symbols=n_symbols, length=length) == pytest.approx(
        length * math.log(n_symbols) / (T + 2 * length))


def test_no_memory_loss_at_the_tcn_papers_t_1000():
    assert no_memory_loss(1000) == pytest.approx(0.0204, abs=1e-4)


@settings(max_examples=40, deadline=None)
@given(n_pairs=st.integers(1, 8), extra=st.integers(0, 20), vocab_extra=st.integers(0, 40),
       seed=st.integers(0, 2**31))
def test_mqar_layout(n_pairs, extra, vocab_extra, seed):
    seq_len, vocab = 4 * n_pairs + extra, 2 * n_pairs + 2 + vocab_extra
    data = mqar(3, seq_len, n_pairs, seed=seed, vocab_size=vocab)
    x, y = data.inputs, data.targets
    assert x.shape == y.shape == (3, seq_len) and data.vocab_size == vocab
    assert bool(((x >= 0) & (x < vocab)).all())
    half = vocab // 2
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        keys, values = row_x[0:2 * n_pairs:2], row_x[1:2 * n_pairs:2]
        assert all(1 <= k < half for k in keys) and len(set(keys)) == n_pairs
        assert all(half <= v < vocab for v in values) and len(set(values)) == n_pairs
        pairs = dict(zip(keys, values, strict=True))
        scored = [t for t, target in enumerate(row_y) if target != IGNORE_INDEX]
        assert len(scored) == n_pairs
        assert all(t >= 2 * n_pairs and (t - 2 * n_pairs) % 2 == 0 for t in scored)
        assert sorted(row_x[t] for t in scored) == sorted(keys)  # every key queried once
        assert all(row_y[t] == pairs[row_x[t]] for t in scored)


def test_induction_layout():
    data = induction(50, 20, seed=3, vocab_size=8)
    x, y = data.inputs, data.targets
    assert x.shape == y.shape == (50, 20) and data.vocab_size == 8
    assert bool(((x >= 0) & (x < 8)).all())
    trigger = 7
    assert bool((x[:, -1] == trigger).all())
    assert bool(((x == trigger).sum(dim=1) == 2).all())  # the trigger occurs exactly twice
    first = (x == trigger).int().argmax(dim=1)
    assert int(first.max()) <= 20 - 3
    assert torch.equal(y[:, -1], x[torch.arange(50), first + 1])
    assert bool((y[:, :-1] == IGNORE_INDEX).all())
    assert bool((y[:, -1] != trigger).all())


def test_planted_keyword_layout():
    k = PLANTED_SET_SIZE
    data = planted_keyword(64, 30, seed=4, vocab_size=20, n_planted=3)
    x, labels, planted = data.inputs, data.labels, data.planted
    assert isinstance(data, PlantedData) and len(data) == 64
    assert x.shape == planted.shape == (64, 30) and labels.shape == (64,)
    assert data.n_classes == 2 and data.vocab_size == 20 and planted.dtype == torch.bool
    assert set(labels.tolist()) == {0, 1}
    assert bool((planted.sum(dim=1) == 3).all())
    assert bool((x[~planted] >= 2 * k).all()) and bool((x < 20).all())  # filler: no keyword
    low = torch.where(labels == 1, 0, k)[:, None].expand_as(x)  # the label's keyword set
    assert bool(((x[planted] >= low[planted]) & (x[planted] < low[planted] + k)).all())


GENERATORS = [
    lambda seed: copy_memory(4, 9, seed=seed),
    lambda seed: mqar(4, 32, 4, seed=seed, vocab_size=32),
    lambda seed: induction(4, 16, seed=seed),
    lambda seed: planted_keyword(4, 16, seed=seed),
]


def _tensors(data):
    if isinstance(data, TaskData):
        return [data.inputs, data.targets]
    return [data.inputs, data.labels, data.planted]


@pytest.mark.parametrize("make", GENERATORS, ids=["copy", "mqar", "induction", "planted"])
def test_same_seed_same_tensors_other_seed_other(make):
    first, again, other = _tensors(make(7)), _tensors(make(7)), _tensors(make(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


def test_task_data_batch():
    data = induction(10, 8, seed=0)
    x, y = data.batch(torch.tensor([3, 1]))
    assert torch.equal(x, data.inputs[[3, 1]]) and torch.equal(y, data.targets[[3, 1]])


@pytest.mark.parametrize("call, name", [
    (lambda: copy_memory(0, 10, seed=0), "n"),
    (lambda: copy_memory(2, 0, seed=0), "T"),
    (lambda: copy_memory(2, 5, seed=-1), "seed"),
    (lambda: copy_memory(2, 5, seed=0, length=0), "length"),
    (lambda: copy_memory(2, 5, seed=0, n_symbols=0), "n_symbols"),
    (lambda: copy_memory(2, 5, seed=0, layout="flat"), "layout"),
    (lambda: no_memory_loss(0), "T"),
    (lambda: mqar(2, 15, 4, seed=0), "seq_len"),
    (lambda: mqar(2, 64, 0, seed=0), "n_pairs"),
    (lambda: mqar(2, 64, 8, seed=0, vocab_size=17), "vocab_size"),
    (lambda: mqar(2, 64, 8, seed=1.5), "seed"),
    (lambda: induction(2, 2, seed=0), "seq_len"),
    (lambda: induction(2, 8, seed=0, vocab_size=2), "vocab_size"),
    (lambda: planted_keyword(2, 1, seed=0, n_planted=2), "seq_len"),
    (lambda: planted_keyword(2, 8, seed=0, vocab_size=2 * PLANTED_SET_SIZE + 1), "vocab_size"),
    (lambda: planted_keyword(2, 8, seed=0, n_planted=0), "n_planted"),
])
def test_bad_arguments_raise_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name} "):
        call()
