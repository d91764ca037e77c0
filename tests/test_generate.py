import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qkv.generate import GenerationConfig, beam_search, generate, stream
from qkv.nn import DecoderLM, EncoderDecoder, EncoderDecoderConfig, TransformerConfig

EOS = 3


def _cfg(**overrides):
    settings = dict(vocab_size=29, d_model=32, n_layers=2, n_heads=4, max_len=64)
    settings.update(overrides)
    return TransformerConfig(**settings)


def _prompt(B=3, L=6, pads=(0, 2, 4)):
    torch.manual_seed(0)
    idx = torch.randint(4, 29, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    return idx, mask


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return DecoderLM(_cfg(positions="rope", n_kv_heads=2)).eval()


@pytest.fixture(scope="module")
def encdec():
    torch.manual_seed(0)
    cfg = EncoderDecoderConfig(encoder=_cfg(n_layers=1), decoder=_cfg(positions="alibi"))
    return EncoderDecoder(cfg).eval()


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_with_cache_equals_without(lm, cache):
    idx, mask = _prompt()
    a = generate(lm, idx, attention_mask=mask, max_new_tokens=6, cache=cache)
    b = generate(lm, idx, attention_mask=mask, max_new_tokens=6, cache=None)
    assert torch.equal(a, b) and a.shape == (3, 12)


def test_sliding_cache_generation():
    torch.manual_seed(0)
    lm = DecoderLM(_cfg(positions="alibi", window=3)).eval()
    idx, mask = _prompt()
    a = generate(lm, idx, attention_mask=mask, max_new_tokens=5, cache="sliding")
    assert torch.equal(a, generate(lm, idx, attention_mask=mask, max_new_tokens=5, cache=None))


def test_left_padded_batch_matches_rows_alone(lm):
    idx, mask = _prompt()
    batch = generate(lm, idx, attention_mask=mask, max_new_tokens=5)
    for b, p in enumerate((0, 2, 4)):
        alone = generate(lm, idx[b:b + 1, p:], max_new_tokens=5)
        assert torch.equal(batch[b:b + 1, 6:], alone[:, 6 - p:])


def test_eos_stops_and_pads():
    torch.manual_seed(0)
    lm = DecoderLM(_cfg()).eval()
    with torch.no_grad():
        lm.lm_head.weight.zero_()
    lm.lm_head.weight.data[EOS, 0] = 0  # all logits equal: argmax is token 0
    idx, mask = _prompt()
    out = generate(lm, idx, attention_mask=mask, max_new_tokens=4, eos_token_id=0,
                   pad_token_id=1)
    assert out.shape == (3, 7) and out[:, 6].tolist() == [0, 0, 0]


def test_eos_rows_get_pad_and_generation_stops(lm):
    idx, mask = _prompt()
    free = generate(lm, idx, attention_mask=mask, max_new_tokens=6)
    eos = int(free[0, 7])  # row 0 emits this at its second new token
    out = generate(lm, idx, attention_mask=mask, max_new_tokens=6, eos_token_id=eos,
                   pad_token_id=0)
    first = (free[:, 6:] == eos).int().argmax(1)
    for b in range(3):
        hit = bool((free[b, 6:] == eos).any())
        n = int(first[b]) + 1 if hit else out.shape[1] - 6
        assert torch.equal(out[b, 6:6 + n], free[b, 6:6 + n])
        assert (out[b, 6 + n:] == 0).all()


def test_stream_and_callback_match_generate(lm):
    idx, mask = _prompt()
    seen = []
    out = generate(lm, idx, attention_mask=mask, max_new_tokens=4, callback=seen.append)
    streamed = list(stream(lm, idx, attention_mask=mask, max_new_tokens=4))
    assert torch.equal(torch.stack(seen, 1), out[:, 6:])
    assert torch.equal(torch.stack(streamed, 1), out[:, 6:])


def test_sampling(lm):
    idx, mask = _prompt()
    def sample(seed, **kw):
        return generate(lm, idx, attention_mask=mask, max_new_tokens=5, do_sample=True,
                        generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(sample(1, temperature=0.7), sample(1, temperature=0.7))
    greedy = generate(lm, idx, attention_mask=mask, max_new_tokens=5)
    assert torch.equal(sample(2, top_k=1), greedy)
    assert torch.equal(sample(3, top_p=1e-6), greedy)
    varied = torch.stack([sample(s, temperature=5.0) for s in range(4)])
    assert not all(torch.equal(varied[0], v) for v in varied[1:])


@torch.no_grad()
def _rescore(model, seqs, prompt_mask, eos, length_penalty, prompt_len):
    """Summed log-probs of the new tokens (up to eos) from one uncached forward pass."""
    mask = torch.cat([prompt_mask, torch.ones_like(seqs[:, prompt_len:])], 1)
    logp = F.log_softmax(model(seqs, attention_mask=mask)[0].double(), -1)
    scores = []
    for b in range(seqs.shape[0]):
        new = seqs[b, prompt_len:].tolist()
        n = new.index(eos) + 1 if eos in new else len(new)
        s = sum(float(logp[b, prompt_len + t - 1, new[t]]) for t in range(n))
        scores.append(s / n ** length_penalty)
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_beam_search_scores_equal_rescoring(lm, cache):
    idx, mask = _prompt()
    free = generate(lm, idx, attention_mask=mask, max_new_tokens=3)
    eos = int(free[1, 7])
    seqs, scores = beam_search(lm, idx, attention_mask=mask, num_beams=3, max_new_tokens=6,
                               eos_token_id=eos, length_penalty=0.8, cache=cache)
    ref = _rescore(lm, seqs, mask, eos, 0.8, 6)
    assert torch.allclose(scores.double(), ref, atol=1e-4)
    assert (seqs[:, 6:] == eos).any()  # some hypotheses ended on eos


def test_beam_search_with_and_without_cache_agree(lm):
    idx, mask = _prompt()
    a = beam_search(lm, idx, attention_mask=mask, num_beams=2, max_new_tokens=4)
    b = beam_search(lm, idx, attention_mask=mask, num_beams=2, max_new_tokens=4, cache=None)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-5)
    assert torch.equal(generate(lm, idx, attention_mask=mask, num_beams=2, max_new_tokens=4),
                       a[0])


def test_encoder_decoder_generation(encdec):
    src, src_mask = _prompt()
    a = generate(encdec, src, attention_mask=src_mask, max_new_tokens=5, bos_token_id=1)
    b = generate(encdec, src, attention_mask=src_mask, max_new_tokens=5, bos_token_id=1,
                 cache=None)
    assert torch.equal(a, b) and (a[:, 0] == 1).all()
    seqs, scores = beam_search(encdec, src, attention_mask=src_mask, num_beams=2,
                               max_new_tokens=4, bos_token_id=1)
    memory = encdec.encode(src, src_mask=src_mask.bool())
    with torch.no_grad():
        logp = F.log_softmax(encdec.decode(seqs, memory, memory_mask=src_mask.bool()), -1)
        ref = logp[:, :-1].gather(-1, seqs[:, 1:, None]).squeeze(-1).sum(1) / 4
    assert torch.allclose(scores, ref, atol=1e-4)


def test_cross_attention_kv_is_projected_once_per_layer(encdec):
    calls = []
    hooks = [layer.cross_attn.kv_proj.register_forward_hook(lambda *a: calls.append(1))
             for layer in encdec.decoder.layers]
    try:
        src, src_mask = _prompt()
        generate(encdec, src, attention_mask=src_mask, max_new_tokens=5, bos_token_id=1)
        assert len(calls) == len(encdec.decoder.layers)
        calls.clear()
        beam_search(encdec, src, attention_mask=src_mask, max_new_tokens=5, bos_token_id=1,
                    num_beams=3)
        assert len(calls) == len(encdec.decoder.layers)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=0.0), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p"), (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2, do_sample=True), "do_sample"), (dict(cache="paged"), "cache"),
    (dict(max_tokens=3), "max_tokens"),
])
def test_bad_settings_raise(lm, kwargs, match):
    idx, _ = _prompt()
    with pytest.raises(ValueError, match=match):
        generate(lm, idx, **kwargs)


def test_bad_inputs_raise(lm, encdec):
    idx, mask = _prompt()
    with pytest.raises(ValueError, match="left-padded"):
        generate(lm, idx, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="attention_mask"):
        generate(lm, idx, attention_mask=mask[:, :3])
    with pytest.raises(ValueError, match="input_ids"):
        generate(lm, torch.randn(2, 3))
    with pytest.raises(ValueError, match="bos_token_id"):
        generate(encdec, idx)
    with pytest.raises(ValueError, match="model"):
        generate(torch.nn.Linear(2, 2), idx)
    with pytest.raises(ValueError, match="callback"):
        generate(lm, idx, num_beams=2, callback=print)
    with pytest.raises(ValueError, match="window"):
        generate(lm, idx, cache="sliding")
    assert GenerationConfig(eos_token_id=5).pad == 5


def test_decode_benchmark_quick_mode():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_cpu.py"
    spec = importlib.util.spec_from_file_location("decode_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--quick"])
    assert rows and {"context", "cache", "tokens_per_s"} <= set(rows[0])


def test_generation_past_the_position_table_fails_before_it_starts():
    model = DecoderLM(_cfg(positions="learned", max_len=16)).eval()
    idx, mask = _prompt(pads=(0, 2, 4))  # longest real row: 6 tokens
    calls = []
    with pytest.raises(ValueError, match="max_len=16"):
        generate(model, idx, attention_mask=mask, max_new_tokens=11, callback=calls.append)
    assert calls == []  # nothing was generated and then thrown away
    out = generate(model, idx, attention_mask=mask, max_new_tokens=10)
    assert out.shape == (3, 16)


def _byte_lm(**overrides):
    from qkv.data import byte_tokenizer

    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    model = DecoderLM(_cfg(vocab_size=tokenizer.vocab_size, **overrides)).eval()
    return model, tokenizer


def test_complete_streams_the_text_it_returns():
    from qkv.generate import complete

    model, tokenizer = _byte_lm(positions="rope")
    pieces = []
    text = complete(model, tokenizer, "def f(x):", max_new_tokens=12, stop_at_eos=False,
                    on_text=pieces.append)
    assert "".join(pieces) == text
    ids = torch.tensor([tokenizer.encode("def f(x):")])
    new = generate(model, ids, max_new_tokens=12)[0, ids.shape[1]:].tolist()
    assert text == tokenizer.decode(new, skip_special_tokens=True)
    with pytest.raises(ValueError, match="empty"):
        complete(model, tokenizer, "")


def test_complete_warns_when_max_new_tokens_is_capped():
    from qkv.generate import complete

    model, tokenizer = _byte_lm(positions="learned", max_len=16)
    with pytest.warns(UserWarning, match=r"max_new_tokens=50 is capped at 10.*max_len=16"):
        complete(model, tokenizer, "abcdef", max_new_tokens=50, stop_at_eos=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        complete(model, tokenizer, "abcdef", max_new_tokens=10, stop_at_eos=False)


@pytest.mark.parametrize("temperature", [1e-40, 1e-320])
def test_a_tiny_temperature_samples_like_greedy(lm, temperature):
    idx, mask = _prompt()
    greedy = generate(lm, idx, attention_mask=mask, max_new_tokens=5)
    sampled = generate(lm, idx, attention_mask=mask, max_new_tokens=5, do_sample=True,
                       temperature=temperature, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, greedy)


@pytest.mark.parametrize("seed", [-1, 2**63, 99999999999999999999999, 1.5])
def test_complete_refuses_a_seed_a_generator_cannot_take(seed):
    from qkv.generate import complete

    model, tokenizer = _byte_lm(positions="learned", max_len=16)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63-1\]"):
        complete(model, tokenizer, "abc", max_new_tokens=2, seed=seed)
