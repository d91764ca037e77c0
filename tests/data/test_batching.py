"""Length bucketing, LM windows and the sharded sampler."""

import numpy as np
import pytest
import torch

from qkv.data import (
    LengthBucketSampler,
    LMWindows,
    ShardedSampler,
    pad_sequences,
    padding_fraction,
    random_batches,
    token_stream,
)


def _lengths(n=2000, seed=0):
    return np.random.default_rng(seed).lognormal(5, 1, n).astype(int) + 1


def test_padding_fraction():
    assert padding_fraction([2, 4, 4], [[0, 1], [2]]) == pytest.approx(1 - 10 / 12)
    assert padding_fraction([3, 3], [[0, 1]]) == 0.0
    assert padding_fraction([], []) == 0.0


@pytest.mark.parametrize("limits", [{"batch_size": 16}, {"max_tokens": 4096},
                                    {"batch_size": 8, "max_tokens": 2048}])
def test_bucketing_covers_each_index_once_within_limits(limits):
    lengths = _lengths()
    sampler = LengthBucketSampler(lengths, seed=1, **limits)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert len(sampler) == len(batches)
    for b in batches:
        if "batch_size" in limits:
            assert len(b) <= limits["batch_size"]
        if "max_tokens" in limits and len(b) > 1:
            assert max(lengths[b]) * len(b) <= limits["max_tokens"]


def test_bucketing_pads_less_than_random_batches():
    lengths = _lengths()
    for limits in ({"batch_size": 16}, {"max_tokens": 4096}):
        bucketed = padding_fraction(lengths, LengthBucketSampler(lengths, seed=0, **limits))
        shuffled = padding_fraction(lengths, random_batches(lengths, seed=0, **limits))
        assert bucketed < 0.1 < 0.4 < shuffled, (limits, bucketed, shuffled)


def test_bucketing_is_seeded_per_epoch():
    lengths = _lengths(500)
    a, b = LengthBucketSampler(lengths, batch_size=8, seed=3), LengthBucketSampler(
        lengths, batch_size=8, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(LengthBucketSampler(lengths, batch_size=8, seed=4)) != first


def test_bucketing_drop_last_and_errors():
    lengths = _lengths(100)
    sampler = LengthBucketSampler(lengths, batch_size=8, pool_batches=2, drop_last=True)
    assert all(len(b) == 8 for b in sampler)
    with pytest.raises(ValueError, match="batch_size, max_tokens"):
        LengthBucketSampler(lengths)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        LengthBucketSampler(lengths, batch_size=0)


def test_bucket_sampler_in_a_dataloader():
    seqs = [list(range(n)) for n in _lengths(64) % 50 + 1]
    sampler = LengthBucketSampler([len(s) for s in seqs], batch_size=4)
    loader = torch.utils.data.DataLoader(seqs, batch_sampler=sampler,
                                         collate_fn=lambda b: pad_sequences(b, pad_id=-1))
    for ids, lengths in loader:
        assert ids.shape == (len(lengths), int(lengths.max()))
        for row, n in zip(ids, lengths, strict=True):
            assert row[:n].tolist() == list(range(n)) and (row[n:] == -1).all()


def test_lm_windows():
    tokens = np.arange(23)
    ds = LMWindows(tokens, seq_len=5)
    assert len(ds) == 4  # windows need seq_len + 1 tokens: 0..5, 5..10, 10..15, 15..20
    x, y = ds[1]
    assert x.tolist() == [5, 6, 7, 8, 9] and y.tolist() == [6, 7, 8, 9, 10]
    assert ds[-1][0].tolist() == [15, 16, 17, 18, 19]
    with pytest.raises(IndexError):
        ds[4]
    overlapping = LMWindows(tokens, seq_len=5, stride=2)
    assert len(overlapping) == 9 and overlapping[8][1].tolist() == [17, 18, 19, 20, 21]
    assert len(LMWindows(np.arange(5), seq_len=5)) == 0
    assert token_stream([[1, 2], [], [3]], eos_id=0).tolist() == [1, 2, 0, 0, 3, 0]


@pytest.mark.parametrize("n, world", [(100, 4), (103, 4), (5, 8), (1, 1)])
def test_sharded_sampler(n, world):
    for drop_last in (False, True):
        shards = [list(ShardedSampler(n, r, world, seed=7, drop_last=drop_last))
                  for r in range(world)]
        sizes = {len(s) for s in shards}
        assert len(sizes) == 1  # equal length per rank
        assert sizes.pop() == len(ShardedSampler(n, 0, world, drop_last=drop_last))
        flat = [i for s in shards for i in s]
        if drop_last:
            assert len(flat) == len(set(flat)) == n // world * world  # disjoint
        else:
            assert set(flat) == set(range(n))  # covering
            assert len(flat) - n < world  # only the wrap-around repeats
    a = ShardedSampler(n, 0, world, seed=7)
    first = list(a)
    a.set_epoch(1)
    assert n < 3 or list(a) != first
    in_order = ShardedSampler(n, 0, world, shuffle=False, drop_last=True)
    assert list(in_order) == list(range(0, n // world * world, world))


def test_sharded_sampler_errors():
    with pytest.raises(ValueError, match="rank"):
        ShardedSampler(10, 4, 4)
