"""Packed rows (idx (T,) with cu_seqlens) against each sequence run alone, in float64."""

import pytest
import torch

from qkv.nn import Decoder, DecoderLM, Encoder, MultiHeadAttention
from qkv.nn.positions import positions_from_cu_seqlens

LENGTHS = [5, 1, 7, 3]
POSITIONS = ["learned", "sinusoidal", "rope", "alibi", "none"]


def _packed(lengths, vocab=37):
    seqs = [torch.randint(0, vocab, (n,)) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return seqs, torch.cat(seqs), cu


def _rows(x, cu):
    return [x[a:b] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)]


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_packed_encoder_equals_each_sequence_alone(tiny, positions, placement):
    enc = Encoder(tiny(positions=positions, norm_placement=placement, n_kv_heads=2, window=2,
                       n_token_types=2)).double().eval()
    seqs, idx, cu = _packed(LENGTHS)
    types = (idx % 2)
    out = enc(idx, cu_seqlens=cu, token_type_ids=types)  # (T, d_model)
    assert out.shape == (sum(LENGTHS), 32)
    for seq, row, t in zip(seqs, _rows(out, cu), _rows(types, cu), strict=True):
        alone = enc(seq[None], token_type_ids=t[None])[0]
        torch.testing.assert_close(row, alone, rtol=1e-10, atol=1e-10)
    padded = torch.zeros(len(seqs), max(LENGTHS), dtype=torch.long)
    for b, seq in enumerate(seqs):
        padded[b, :len(seq)] = seq
    batch = enc(padded, lengths=torch.tensor(LENGTHS),
                token_type_ids=padded % 2)  # the padded path, right padding
    for b, row in enumerate(_rows(out, cu)):
        torch.testing.assert_close(row, batch[b, :LENGTHS[b]], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("positions", POSITIONS)
def test_packed_decoder_lm_is_causal_within_each_sequence(tiny, positions):
    lm = DecoderLM(tiny(positions=positions, n_kv_heads=1, window=3)).double().eval()
    seqs, idx, cu = _packed(LENGTHS)
    logits, loss = lm(idx, idx, cu_seqlens=cu)  # (T, V)
    for seq, row in zip(seqs, _rows(logits, cu), strict=True):
        torch.testing.assert_close(row, lm(seq[None])[0][0], rtol=1e-10, atol=1e-10)
    want = torch.nn.functional.cross_entropy(logits, idx)
    torch.testing.assert_close(loss, want)
    last = lm(idx, cu_seqlens=cu, last_only=True)[0]  # (B, 1, V)
    torch.testing.assert_close(last[:, 0], logits[cu[1:].long() - 1])


def test_packed_gradients_equal_the_padded_path(tiny):
    lm = DecoderLM(tiny(positions="rope")).double()
    seqs, idx, cu = _packed(LENGTHS)
    lm(idx, idx, cu_seqlens=cu)[1].backward()
    packed = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    total = sum(lm(s[None], s[None])[1] * len(s) for s in seqs) / sum(LENGTHS)
    total.backward()
    for name, p in lm.named_parameters():
        torch.testing.assert_close(packed[name], p.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("positions", ["rope", "alibi", "learned"])
def test_packed_cross_attention_reads_its_own_memory(tiny, positions):
    enc = Encoder(tiny()).double().eval()
    dec = Decoder(tiny(positions=positions), cross=True).double().eval()
    src, src_idx, src_cu = _packed([4, 6, 2, 3])
    tgt, tgt_idx, tgt_cu = _packed(LENGTHS)
    memory = enc(src_idx, cu_seqlens=src_cu)  # (Tm, d_model)
    out = dec(tgt_idx, memory, cu_seqlens=tgt_cu, memory_cu_seqlens=src_cu)
    for s, t, row in zip(src, tgt, _rows(out, tgt_cu), strict=True):
        alone = dec(t[None], enc(s[None]))[0]
        torch.testing.assert_close(row, alone, rtol=1e-10, atol=1e-10)


def test_positions_restart_in_every_sequence():
    cu = torch.tensor([0, 3, 3, 5])
    assert positions_from_cu_seqlens(cu, 5).tolist() == [0, 1, 2, 0, 1]
    for bad in (torch.tensor([0, 3, 2, 5]), torch.tensor([1, 5]), torch.tensor([0, 4]),
                torch.tensor([[0, 5]]), torch.tensor([0.0, 5.0])):
        with pytest.raises(ValueError, match="cu_seqlens"):
            positions_from_cu_seqlens(bad, 5)


def test_packed_input_errors(tiny):
    enc, lm = Encoder(tiny()), DecoderLM(tiny())
    dec = Decoder(tiny(), cross=True)
    _, idx, cu = _packed(LENGTHS)
    with pytest.raises(ValueError, match="attention_mask"):
        enc(idx, cu_seqlens=cu, attention_mask=torch.ones(1, 16))
    with pytest.raises(ValueError, match=r"idx must be an integer tensor \(T,\)"):
        enc(idx[None], cu_seqlens=cu)
    with pytest.raises(ValueError, match="cache"):
        from qkv.nn import DynamicCache
        lm(idx, cu_seqlens=cu, cache=DynamicCache())
    with pytest.raises(ValueError, match="cu_seqlens"):
        enc(idx, cu_seqlens=torch.tensor([0, 3]))
    memory = torch.randn(6, 32)
    with pytest.raises(ValueError, match="context_cu_seqlens"):
        dec(idx, memory, cu_seqlens=cu)
    with pytest.raises(ValueError, match="memory_cu_seqlens"):
        dec(idx[None], memory[None], memory_cu_seqlens=torch.tensor([0, 6]))
    attn = MultiHeadAttention(tiny().attention())
    with pytest.raises(ValueError, match=r"\(T, 32\) with cu_seqlens"):
        attn(torch.randn(2, 3, 32), cu_seqlens=cu)


def test_packed_encoder_decoder_equals_each_pair_alone(tiny):
    from qkv.nn import EncoderDecoder, EncoderDecoderConfig

    model = EncoderDecoder(EncoderDecoderConfig(encoder=tiny(), decoder=tiny(positions="rope")))
    model = model.double().eval()
    src, src_idx, src_cu = _packed([4, 6, 2, 3])
    tgt, tgt_idx, tgt_cu = _packed(LENGTHS)
    logits, loss = model(src_idx, tgt_idx, tgt_idx, src_cu_seqlens=src_cu,
                         tgt_cu_seqlens=tgt_cu)  # (T, V)
    for s, t, row in zip(src, tgt, _rows(logits, tgt_cu), strict=True):
        torch.testing.assert_close(row, model(s[None], t[None])[0][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, tgt_idx))
    memory = model.encode(src_idx, src_cu_seqlens=src_cu)
    last = model.decode(tgt_idx, memory, tgt_cu_seqlens=tgt_cu, memory_cu_seqlens=src_cu,
                        last_only=True)  # (B, 1, V)
    torch.testing.assert_close(last[:, 0], logits[tgt_cu[1:].long() - 1])
