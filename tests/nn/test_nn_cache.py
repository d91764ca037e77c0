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


def _step(cache, B: int, L: int, Hk: int = 3, D: int = 4, dtype=torch.float32):
    """One step of L new keys and values (B, Hk, L, D) through layer 0 of `cache`."""
    cache.step(None, B, L, "cpu")
    k, v = torch.randn(B, Hk, L, D, dtype=dtype), torch.randn(B, Hk, L, D, dtype=dtype)
    return (k, v), cache.update(0, k, v)


def test_dynamic_cache_grows_by_an_eighth_and_never_changes_what_it_returned():
    cache = DynamicCache()
    (k, v), _ = _step(cache, 2, 5)
    handed, moves, buffer = [], 0, cache.k[0]
    for _ in range(300):
        (k1, v1), (k_all, v_all, lengths) = _step(cache, 2, 1)
        k, v = torch.cat((k, k1), 2), torch.cat((v, v1), 2)
        assert lengths is None and torch.equal(k_all, k) and torch.equal(v_all, v)
        handed.append((k_all, v_all, k.clone(), v.clone()))
        need = k.shape[2]
        assert need <= cache.k[0].shape[2] <= need + max(need // 8, DynamicCache.MIN_SPARE)
        moves += cache.k[0] is not buffer
        buffer = cache.k[0]
    assert moves <= 4  # 69 -> 134 -> 199 -> 264 -> 329 keys of room
    # later appends wrote past every earlier view, and moves left the old buffers as they were
    assert all(torch.equal(a, b) and torch.equal(c, d) for a, c, b, d in handed)


def test_dynamic_cache_reorder_leaves_earlier_views_alone():
    cache = DynamicCache()
    _step(cache, 2, 4)
    (_, _), (k_all, _, _) = _step(cache, 2, 1)  # a view of a buffer with room to spare
    before = k_all.clone()
    cache.reorder(torch.tensor([1, 0]))
    assert torch.equal(k_all, before)
    (k1, _), (k_next, _, _) = _step(cache, 2, 1)
    assert torch.equal(k_next, torch.cat((before.flip(0), k1), 2))


def test_dynamic_cache_under_autograd_gives_the_gradients_of_the_full_pass(left_padded, tiny):
    """With grad, appends concatenate: nothing saved for backward is written in place."""
    lm = DecoderLM(tiny(positions="rope")).double()
    idx, mask = left_padded(2, 9, [0, 2])
    full = lm(idx, attention_mask=mask)[0][mask].sum()
    want = torch.autograd.grad(full, list(lm.parameters()))
    inc = _incremental(lm, idx, mask, DynamicCache())[mask].sum()
    got = torch.autograd.grad(inc, list(lm.parameters()))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def test_prefill_under_inference_mode_then_decode_under_no_grad(tiny):
    lm = DecoderLM(tiny(positions="rope")).eval()
    idx = torch.randint(0, 37, (2, 7))
    cache = DynamicCache()
    with torch.inference_mode():
        lm(idx[:, :5], cache=cache)
    with torch.no_grad():
        out = torch.cat([lm(idx[:, t:t + 1], cache=cache)[0] for t in (5, 6)], 1)
        assert torch.allclose(out, lm(idx)[0][:, 5:], atol=1e-5)


@pytest.mark.parametrize("kind", ["dynamic", "static", "sliding"])
def test_cache_rejects_keys_unlike_the_ones_it_holds(kind):
    cache = make_cache(kind, max_len=8, window=4)
    _step(cache, 1, 2)
    with pytest.raises(ValueError, match="k of layer 0 must match"):
        _step(cache, 1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"cached keys: \(B, 3, L, 4\)"):
        _step(cache, 1, 1, Hk=2)
