"""qkv as transformers' attention backend: the same models under "eager" are the oracle.

Tiny random-initialised Llama (GQA), Gemma-2 (sliding window, softcap), Qwen2 (sliding window on
some layers), gpt-oss (attention sinks) and BERT; no hub access. Positions a padding token
occupies are not compared: no real token reads them, and every implementation fills them
differently.
"""

import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import masking_utils as mu  # noqa: E402

from qkv.interop import hf  # noqa: E402

VOCAB = 96
DECODERS = ("llama", "gemma2", "qwen2", "gpt_oss")
MODELS = (*DECODERS, "bert")


def _config(name: str):
    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64)
    if name == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, **small)
    if name == "gemma2":
        return transformers.Gemma2Config(
            num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
            attn_logit_softcapping=2.0, final_logit_softcapping=5.0, **small)
    if name == "qwen2":
        return transformers.Qwen2Config(num_key_value_heads=1, use_sliding_window=True,
                                        sliding_window=3, max_window_layers=1, **small)
    if name == "gpt_oss":  # attention sinks; its default context keeps YaRN's factor consistent
        del small["max_position_embeddings"]
        return transformers.GptOssConfig(num_key_value_heads=2, head_dim=8, sliding_window=4,
                                         num_local_experts=2, num_experts_per_tok=1, **small)
    return transformers.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                   **small)


_CLASSES = {"llama": "LlamaForCausalLM", "gemma2": "Gemma2ForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "gpt_oss": "GptOssForCausalLM",
            "bert": "BertForMaskedLM"}


@pytest.fixture(scope="module", autouse=True)
def registered():
    return hf.register()


@pytest.fixture
def described(monkeypatch):
    """Fail if qkv's mask function falls back to a dense (Lq, Lk) mask."""
    def dense(**_):
        raise AssertionError("qkv built a dense mask")

    masks = types.SimpleNamespace(**{**vars(mu), "sdpa_mask": dense})
    monkeypatch.setattr(hf, "_mask_utils", lambda: masks)


def _model(name: str, dtype=torch.float32):
    torch.manual_seed(0)
    cls = getattr(transformers, _CLASSES[name])
    model = cls._from_config(_config(name), attn_implementation="eager", dtype=dtype)
    return model.eval()


def _batch(padding: str, B: int = 2, L: int = 10):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if padding == "left":
        mask[0, :3] = 0
        mask[1, :1] = 0
    elif padding == "right":
        mask[0, -4:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def _both(model, fn):
    """fn(model) under eager, then under qkv."""
    out = {}
    for impl in ("eager", "qkv"):
        model.set_attn_implementation(impl)
        out[impl] = fn(model)
    return out["eager"], out["qkv"]


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("name", MODELS)
def test_logits_match_eager(name, padding, described):
    model = _model(name)
    ids, mask = _batch(padding)
    with torch.no_grad():
        eager, ours = _both(model, lambda m: m(ids, attention_mask=mask).logits)
    real = mask.bool()
    assert torch.allclose(ours[real], eager[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", DECODERS)
def test_greedy_generate_matches_eager(name, cache, described):
    model = _model(name)
    ids, mask = _batch("left")

    def generate(m):
        return m.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                          cache_implementation=cache, pad_token_id=0)

    eager, ours = _both(model, generate)
    assert ours.shape == (2, 16)
    assert torch.equal(ours, eager)


def _grads(name: str, packed: bool = False):
    """Gradients of one training step, float32, under eager and qkv (eager takes its softmax in
    float32 whatever the dtype, so float64 would not make it a sharper oracle)."""
    model = _model(name).train()
    ids, mask = _batch("none" if packed else "left")
    extra = dict(attention_mask=mask)
    if packed:  # three sequences in each row: 4, 3 and 3 tokens
        extra = dict(position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]]).expand(2, -1),
                     use_cache=False)
    # No loss on a pad, nor on the token a pad position predicts (the first real one).
    follows_pad = torch.nn.functional.pad(mask[:, :-1], (1, 0), value=1) == 0
    labels = ids.masked_fill((mask == 0) | follows_pad, -100)

    def step(m):
        m.zero_grad()
        m(ids, labels=labels, **extra).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    return _both(model, step)


@pytest.mark.parametrize("name", MODELS)
def test_training_gradients_match_eager(name, described):
    eager, ours = _grads(name)
    assert eager.keys() == ours.keys() and len(eager) > 10
    for n in eager:
        assert torch.allclose(ours[n], eager[n], atol=1e-6, rtol=1e-4), n


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_packed_sequences_match_eager(name, described):
    eager, ours = _grads(name, packed=True)
    for n in eager:
        assert torch.allclose(ours[n], eager[n], atol=1e-6, rtol=1e-4), n


# -- the mask function, against transformers' dense masks ------------------------------------

def _dense(spec: hf.MaskSpec) -> torch.Tensor:
    """The (B, 1, Lq, Lk) bool mask a MaskSpec means, from DESIGN.md's visibility rules."""
    B, _, Lq, Lk = spec.shape
    n = Lk if spec.keys is None else spec.keys
    i = torch.arange(Lq).view(-1, 1) + (n - Lq)
    j = torch.arange(Lk).view(1, -1)
    vis = (j < n).expand(Lq, Lk).clone()
    if spec.causal:
        vis &= j <= i
    left, right = spec.window or (None, None)
    if left is not None:
        vis &= j >= i - left
    if right is not None:
        vis &= j <= i + right
    vis = vis.expand(B, 1, Lq, Lk)
    if spec.kv_lengths is not None:
        vis = vis & (j < spec.kv_lengths.view(B, 1, 1, 1))
    if spec.mask is not None:
        vis = vis & torch.nn.functional.pad(spec.mask, (0, Lk - n))
    return vis


PADDED = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
CASES = {
    # name: (mask_function, q_length, kv_length, q_offset, kv_offset, attention_mask)
    "causal": (mu.causal_mask_function, 6, 6, 0, 0, None),
    "causal, left padding": (mu.causal_mask_function, 8, 8, 0, 0, PADDED),
    "causal, right padding": (mu.causal_mask_function, 8, 8, 0, 0, PADDED.flip(-1)),
    "decode, dynamic cache": (mu.causal_mask_function, 1, 8, 7, 0, PADDED),
    "prefill, static cache": (mu.causal_mask_function, 5, 8, 0, 0, PADDED[:, :5]),
    "decode, static cache": (mu.causal_mask_function, 1, 8, torch.tensor(5), 0, PADDED[:, :6]),
    "sliding": (mu.sliding_window_causal_mask_function(3), 8, 8, 0, 0, PADDED),
    "sliding, full window cache": (mu.sliding_window_causal_mask_function(3), 2, 4, 9, 7, None),
    "sliding, static window": (mu.sliding_window_causal_mask_function(6), 3, 6, 0, 0, None),
    "bidirectional": (mu.bidirectional_mask_function, 8, 8, 0, 0, PADDED),
    "bidirectional, cross": (mu.bidirectional_mask_function, 3, 8, 0, 0, PADDED),
    "bidirectional sliding": (mu.sliding_window_bidirectional_mask_function(2), 8, 8, 0, 0, None),
}


@pytest.mark.parametrize("case", CASES)
def test_mask_spec_means_transformers_mask(case):
    fn, Lq, Lk, q_offset, kv_offset, padding = CASES[case]
    args = dict(batch_size=2, q_length=Lq, kv_length=Lk, q_offset=q_offset, kv_offset=kv_offset,
                mask_function=fn, attention_mask=padding)
    spec = hf.mask_for(**args)
    assert isinstance(spec, hf.MaskSpec), "described, not materialised"
    want = mu.sdpa_mask(**args, allow_is_causal_skip=False)
    assert torch.equal(_dense(spec), want.expand(2, 1, Lq, Lk))
    if spec.mask is not None:
        assert spec.mask.shape[1:3] == (1, 1)  # a padding view, never (Lq, Lk)


def test_right_padding_becomes_kv_lengths():
    spec = hf.mask_for(**dict(batch_size=2, q_length=8, kv_length=8,
                              mask_function=mu.bidirectional_mask_function,
                              attention_mask=PADDED.flip(-1)))
    assert spec.mask is None and spec.kv_lengths.tolist() == [6, 8]


def test_unknown_mask_function_falls_back_to_transformers_mask():
    def even_keys(b, h, q, kv):
        return kv % 2 == 0

    fn = mu.and_masks(mu.causal_mask_function, even_keys)
    mask = hf.mask_for(batch_size=2, q_length=5, kv_length=5, mask_function=fn,
                       attention_mask=None)
    want = mu.sdpa_mask(batch_size=2, q_length=5, kv_length=5, mask_function=fn,
                        allow_is_causal_skip=False)
    assert isinstance(mask, torch.Tensor) and torch.equal(mask, want)


# -- the adapter -------------------------------------------------------------------------------

class _Layer(torch.nn.Module):
    is_causal = True


def _qkv(B=2, Hq=4, Hk=2, Lq=5, Lk=5, D=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(B, Hq, Lq, D, generator=g, dtype=dtype),
            torch.randn(B, Hk, Lk, D, generator=g, dtype=dtype),
            torch.randn(B, Hk, Lk, D, generator=g, dtype=dtype))


def test_adapter_passes_gqa_heads_and_padding_views_unchanged(monkeypatch):
    seen = {}

    def spy(q, k, v, **kw):
        seen.update(k=k, mask=kw.get("mask"))
        return real(q, k, v, **kw)

    real = hf.attention
    monkeypatch.setattr(hf, "attention", spy)
    q, k, v = _qkv()
    spec = hf.mask_for(batch_size=2, q_length=5, kv_length=5, attention_mask=PADDED[:, :5])
    out, weights = hf.attention_forward(_Layer(), q, k, v, spec)
    assert out.shape == (2, 5, 4, 8) and weights is None
    assert seen["k"] is k  # K/V heads reach qkv.attention unrepeated
    assert seen["mask"].shape == (2, 1, 1, 5)


def test_sinks_renormalise_like_eager():
    q, k, v = _qkv()
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    out, _ = hf.attention_forward(_Layer(), q, k, v, None, s_aux=sinks, scaling=0.5)
    k4, v4 = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = (q @ k4.transpose(-1, -2)) * 0.5
    s = s.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    s = torch.cat([s, sinks.view(1, -1, 1, 1).expand(2, 4, 5, 1)], dim=-1)
    want = (s.softmax(-1)[..., :-1] @ v4).transpose(1, 2)
    assert torch.allclose(out, want, atol=1e-12)


def test_output_attentions_returns_the_weights():
    q, k, v = _qkv()
    out, weights = hf.attention_forward(_Layer(), q, k, v, None, output_attentions=True)
    assert weights.shape == (2, 4, 5, 5)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 5, dtype=torch.float64))
    assert torch.count_nonzero(weights[..., 0, 1:]) == 0  # causal


def test_float_mask_is_a_bias_and_bool_mask_a_mask():
    q, k, v = _qkv()
    causal = torch.ones(5, 5, dtype=torch.bool).tril().view(1, 1, 5, 5)
    additive = torch.zeros(1, 1, 5, 5, dtype=torch.float64).masked_fill(~causal, -1e30)
    a, _ = hf.attention_forward(_Layer(), q, k, v, causal)
    b, _ = hf.attention_forward(_Layer(), q, k, v, additive)
    c, _ = hf.attention_forward(_Layer(), q, k, v, None)
    assert torch.allclose(a, c, atol=1e-12) and torch.allclose(b, c, atol=1e-12)


def test_position_bias_adds_to_the_scores():
    q, k, v = _qkv()
    bias = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    out, _ = hf.attention_forward(_Layer(), q, k, v, None, position_bias=bias)
    want = hf.attention(q, k, v, causal=True, bias=bias).transpose(1, 2)
    assert torch.allclose(out, want, atol=1e-12)


def test_attention_dropout_is_reproducible():
    config = _config("llama")
    config.attention_dropout = 0.5
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="qkv")
    ids, mask = _batch("left")

    def logits(seed):
        torch.manual_seed(seed)
        return model(ids, attention_mask=mask).logits

    assert torch.equal(logits(3), logits(3))
    assert not torch.allclose(logits(3), logits(4))
    model.eval()
    assert torch.equal(logits(3), logits(4))


def test_errors_name_what_is_wrong():
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="head_mask"):
        hf.attention_forward(_Layer(), q, k, v, None, head_mask=torch.ones(4))
    with pytest.raises(NotImplementedError, match="attention_mask"):
        hf.attention_forward(_Layer(), q, k, v, [[1, 0]])
    wrong = hf.mask_for(batch_size=2, q_length=5, kv_length=6)
    with pytest.raises(ValueError, match="attention_mask"):
        hf.attention_forward(_Layer(), q, k, v, wrong)
    with pytest.raises(ValueError, match="backend"):
        hf.register("qkv-x", backend="nope")
    with pytest.raises(ValueError, match="name"):
        hf.register("a/b")
