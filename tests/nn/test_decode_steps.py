"""What a decoding step hands to qkv.attention: no keys that no query sees, no mask built over
the whole cache for a single query; and the decode breakdown benchmark's quick mode."""

import importlib.util
from pathlib import Path

import pytest
import torch

import qkv
from qkv.nn import AttentionConfig, DecoderLM, DynamicCache, MultiHeadAttention
from qkv.nn.attention import _seen_keys


@pytest.mark.parametrize("Lq, Lk", [(1, 1), (1, 9), (3, 9), (4, 4)])
@pytest.mark.parametrize("window", [None, (2, 0), (3, 3), (0, 0), (20, 0)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_seen_keys_give_the_same_attention(Lq, Lk, window, causal, masked):
    q = torch.randn(2, 4, Lq, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 2, Lk, 8, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(2, 1, 1, Lk) > 0.3 if masked else None
    settings = dict(alibi_slopes=torch.rand(4, dtype=torch.float64), backend="reference")
    want = qkv.attention(q, k, v, mask=mask, causal=causal, window=window, **settings)
    k2, v2, mask2, causal2, window2 = _seen_keys(k, v, mask, Lq, causal, window, None)
    got = qkv.attention(q, k2, v2, mask=mask2, causal=causal2, window=window2, **settings)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    if window is not None and window[0] is not None:
        assert k2.shape[2] == min(Lk, Lq + window[0])
    if Lq == 1:
        assert (causal2, window2) == (False, None)


def test_seen_keys_keep_every_key_when_lengths_count_from_the_first():
    k = v = torch.randn(1, 1, 9, 4)
    lengths = torch.tensor([5])
    assert _seen_keys(k, v, None, 1, True, (2, 0), lengths)[0].shape[2] == 9
    assert _seen_keys(k, v, None, 1, True, (2, 0), lengths)[2:] == (None, False, (2, 0))


@pytest.mark.parametrize("window", [None, 3])
def test_a_decoding_step_asks_for_no_mask(monkeypatch, tiny, window):
    lm = DecoderLM(tiny(positions="rope", window=window)).eval()
    cache, seen = DynamicCache(), []
    lm(torch.randint(0, 37, (2, 8)), cache=cache)

    def spy(q, k, v, **keywords):
        seen.append((k.shape[2], keywords))
        return attention(q, k, v, **keywords)

    attention = qkv.attention
    monkeypatch.setattr(qkv, "attention", spy)
    lm(torch.randint(0, 37, (2, 1)), cache=cache)
    for n_keys, keywords in seen:
        assert n_keys == (9 if window is None else window + 1)
        assert not keywords["causal"] and keywords["window"] is None
        assert keywords["mask"] is None and keywords["kv_lengths"] is None


@pytest.mark.parametrize("packed", [False, True])
def test_rope_rotates_q_and_k_heads_in_one_call_as_apart(packed):
    mha = MultiHeadAttention(AttentionConfig(d_model=48, n_heads=6, n_kv_heads=2,
                                             positions="rope")).double()
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    q, k, v = mha.qkv_proj(x).split((48, 16, 16), dim=-1)
    q, k, v = (t.unflatten(-1, (-1, 8)).transpose(1, 2) for t in (q, k, v))
    q, k = mha.rope(q, positions), mha.rope(k, positions)
    want = mha.out_proj(qkv.attention(q, k, v, causal=True).transpose(1, 2).flatten(-2))
    if packed:  # two sequences back to back, positions restarting at 0 in each
        cu = torch.tensor([0, 5, 10])
        got = mha(x.flatten(0, 1), causal=True, cu_seqlens=cu).unflatten(0, (2, 5))
        want[1] = mha(x[1:], causal=True)[0]
    else:
        got = mha(x, causal=True, positions=positions)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_decode_breakdown_benchmark_quick_mode():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_breakdown_cpu.py"
    spec = importlib.util.spec_from_file_location("decode_breakdown_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--quick", "--steps", "1", "--contexts", "16"])
    assert [r["cache"] for r in rows] == ["static", "dynamic"]
    for r in rows:
        assert r["total_ms"] >= r["attention_ms"] > 0 and r["update_ms"] > 0
        assert r["kv_mib"] > 0 and r["read_ms"] > 0 and r["sdpa_ms"] > 0
