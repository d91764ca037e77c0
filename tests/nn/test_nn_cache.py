import pytest
import torch

from qkv.nn import (
    CrossAttentionCache,
    DecoderLM,
    DynamicCache,
    EncoderDecoder,
    EncoderDecoderConfig,
    SlidingWindowCache,
    StaticCache,
    make_cache,
)


def _incremental(model, idx, mask, cache, prompt=5):
    """Logits from a prompt chunk, a 2-token chunk, then one token at a time."""
    chunks = [(0, prompt), (prompt, prompt + 2)]
    chunks += [(t, t + 1) for t in range(prompt + 2, idx.shape[1])]
    outs = [model(idx[:, a:b], attention_mask=mask[:, a:b], cache=cache)[0] for a, b in chunks]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "rope", "alibi"])
@pytest.mark.parametrize("kind", ["dynamic", "static", "sliding"])
def test_cached_logits_equal_uncached(left_padded, tiny, positions, kind):
    window = 3 if kind == "sliding" else None
    lm = DecoderLM(tiny(positions=positions, n_kv_heads=2, window=window)).eval()
    idx, mask = left_padded(3, 11, [0, 2, 4])
    full = lm(idx, attention_mask=mask)[0]
    cache = make_cache(kind, max_len=11, window=window)
    inc = _incremental(lm, idx, mask, cache)
    assert torch.allclose(inc[mask], full[mask], atol=1e-5)


@pytest.mark.parametrize("cache", [DynamicCache(), SlidingWindowCache(4)])
def test_windowed_model_with_a_larger_or_growing_cache(left_padded, tiny, cache):
    lm = DecoderLM(tiny(positions="alibi", window=2)).eval()
    idx, mask = left_padded(2, 10, [0, 3])
    full = lm(idx, attention_mask=mask)[0]
    assert torch.allclose(_incremental(lm, idx, mask, cache)[mask], full[mask], atol=1e-5)


def test_sliding_cache_keeps_only_the_window(left_padded, tiny):
    lm = DecoderLM(tiny(positions="rope", window=3)).eval()
    cache = SlidingWindowCache(3)
    idx, mask = left_padded(2, 9, [0, 5])
    _incremental(lm, idx, mask, cache)
    assert all(k.shape[2] == 3 for k in cache.k.values())
    assert cache.offsets.tolist() == [9, 4]  # left padding does not count toward positions
    assert cache._mask is None  # the padding has slid out of the window


def test_static_cache_is_preallocated_and_bounded(tiny):
    lm = DecoderLM(tiny()).eval()
    cache = StaticCache(6)
    lm(torch.ones(2, 4, dtype=torch.long), cache=cache)
    assert cache.k[0].shape[2] == 6
    lm(torch.ones(2, 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_len=6"):
        lm(torch.ones(2, 1, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("kind", ["dynamic", "static", "sliding"])
def test_reorder_follows_rows(left_padded, tiny, kind):
    lm = DecoderLM(tiny(positions="rope", window=3)).eval()
    idx, mask = left_padded(2, 6, [0, 2])
    a, b = (make_cache(kind, max_len=8, window=3) for _ in range(2))
    lm(idx, attention_mask=mask, cache=a)
    lm(idx.flip(0), attention_mask=mask.flip(0), cache=b)
    stored = b.k[0]
    b.reorder(torch.tensor([1, 0]))
    assert (b.k[0] is stored) == (kind == "static")  # the static buffers keep their storage
    nxt = torch.tensor([[3], [4]])
    assert torch.allclose(lm(nxt, cache=a)[0], lm(nxt, cache=b)[0], atol=1e-6)


def test_cross_attention_cache_reorder():
    cross = CrossAttentionCache()
    k, v = torch.randn(3, 2, 4, 8), torch.randn(3, 2, 4, 8)
    cross.set(0, k, v)
    index = torch.tensor([2, 2, 0])
    cross.reorder(index)
    assert torch.equal(cross.get(0)[0], k[index]) and torch.equal(cross.get(0)[1], v[index])


def test_cross_attention_cache_reuses_memory_kv(left_padded, tiny):
    ed = EncoderDecoder(EncoderDecoderConfig(encoder=tiny(), decoder=tiny(positions="rope")))
    ed.eval()
    src, src_mask = left_padded(2, 6, [0, 2])
    tgt = torch.randint(0, 37, (2, 5))
    memory = ed.encode(src, src_mask=src_mask)
    full = ed.decode(tgt, memory, memory_mask=src_mask)
    cache, cross = DynamicCache(), CrossAttentionCache()
    outs = [ed.decode(tgt[:, :2], memory, memory_mask=src_mask, cache=cache, cross_cache=cross)]
    for t in range(2, 5):  # the memory is no longer needed once the cross cache is filled
        outs.append(ed.decode(tgt[:, t:t + 1], None, memory_mask=src_mask, cache=cache,
                              cross_cache=cross))
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5)
    assert sorted(cross.k) == sorted(cross.v) == [0, 1]


def test_cache_misuse_raises(tiny):
    lm = DecoderLM(tiny()).eval()
    with pytest.raises(ValueError, match="window"):
        lm(torch.ones(1, 3, dtype=torch.long), cache=SlidingWindowCache(4))
    windowed = DecoderLM(tiny(window=4)).eval()
    with pytest.raises(ValueError, match="window"):
        windowed(torch.ones(1, 3, dtype=torch.long), cache=SlidingWindowCache(2))
    cache = DynamicCache()
    lm(torch.ones(2, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="batch of 2"):
        lm(torch.ones(3, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="lengths"):
        lm(torch.ones(2, 1, dtype=torch.long), lengths=torch.tensor([1, 1]), cache=cache)
    with pytest.raises(ValueError, match="cache must be one of"):
        make_cache("paged")
    with pytest.raises(ValueError, match="max_len"):
        make_cache("static")
    with pytest.raises(ValueError, match="step"):
        DynamicCache().update(0, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))
