import pytest
import torch
import torch.nn.functional as F

from qkv.nn import (
    IGNORE_INDEX,
    DecoderLM,
    Encoder,
    EncoderDecoder,
    EncoderDecoderConfig,
    TransformerConfig,
)

POSITIONS = ["learned", "sinusoidal", "rope", "alibi", "none"]


@pytest.mark.parametrize("positions, placement", [
    ("learned", "post"), ("sinusoidal", "pre"), ("rope", "pre"), ("alibi", "post"), ("none", "pre"),
])
def test_models_agree_on_every_backend(left_padded, tiny, fast_backends, positions, placement):
    cfg = tiny(positions=positions, norm_placement=placement, n_kv_heads=2, n_layers=1)
    idx, mask = left_padded(2, 7, [0, 3])
    lm, enc = DecoderLM(cfg).eval(), Encoder(cfg).eval()
    ed = EncoderDecoder(EncoderDecoderConfig(encoder=cfg, decoder=cfg)).eval()
    lengths = torch.tensor([7, 4])
    ref_lm = lm(idx, attention_mask=mask, backend="reference")[0]
    ref_enc = enc(idx, lengths=lengths, backend="reference")
    ref_ed = ed(idx, idx, src_lengths=lengths, backend="reference")[0]
    for name in fast_backends:
        got = lm(idx, attention_mask=mask, backend=name)[0]
        assert torch.allclose(got[mask], ref_lm[mask], atol=1e-5), name
        got = enc(idx, lengths=lengths, backend=name)
        assert torch.allclose(got[:, :4], ref_enc[:, :4], atol=1e-5), name
        assert torch.allclose(ed(idx, idx, src_lengths=lengths, backend=name)[0], ref_ed,
                              atol=1e-5), name


@pytest.mark.parametrize("positions", POSITIONS)
def test_left_padding_does_not_change_a_row(left_padded, tiny, positions):
    lm = DecoderLM(tiny(positions=positions)).eval()
    idx, mask = left_padded(2, 9, [0, 4])
    padded = lm(idx, attention_mask=mask)[0][1, 4:]
    alone = lm(idx[1:, 4:])[0][0]
    assert torch.allclose(padded, alone, atol=1e-5)


def test_encoder_padding_as_lengths_or_mask(tiny):
    enc = Encoder(tiny(norm_placement="post", embed_norm=True, n_token_types=2)).eval()
    idx = torch.randint(0, 37, (2, 6))
    types = torch.randint(0, 2, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    a = enc(idx, attention_mask=mask, token_type_ids=types)
    b = enc(idx, lengths=torch.tensor([6, 3]), token_type_ids=types)
    assert torch.allclose(a[0], b[0], atol=1e-6) and torch.allclose(a[1, :3], b[1, :3], atol=1e-6)
    alone = enc(idx[1:, :3], token_type_ids=types[1:, :3])
    assert torch.allclose(b[1, :3], alone[0], atol=1e-5)


def test_lm_loss_and_tied_embeddings(tiny):
    lm = DecoderLM(tiny())
    idx = torch.randint(0, 37, (2, 5))
    targets = idx.clone()
    targets[0, :2] = IGNORE_INDEX
    logits, loss = lm(idx, targets)
    assert logits.shape == (2, 5, 37)
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert torch.allclose(loss, ref)
    assert lm(idx)[1] is None and lm(idx, last_only=True)[0].shape == (2, 1, 37)
    assert lm.lm_head.weight is lm.embed.tok_emb.weight
    untied = DecoderLM(tiny(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.embed.tok_emb.weight
    loss.backward()


def test_final_norm_follows_placement(tiny):
    assert DecoderLM(tiny(norm_placement="pre")).final_norm is not None
    assert Encoder(tiny(norm_placement="post")).final_norm is None
    assert Encoder(tiny(norm_placement="post", final_norm=True)).final_norm is not None


def test_decoder_lm_on_every_backend(left_padded, tiny, cpu_backends):
    lm = DecoderLM(tiny(positions="rope", n_layers=1, n_heads=2, d_model=16)).eval()
    idx, mask = left_padded(2, 5, [0, 2])
    ref = lm(idx, attention_mask=mask, backend="reference")[0]
    for name in cpu_backends:
        got = lm(idx, attention_mask=mask, backend=name)[0]
        assert torch.allclose(got[mask], ref[mask], atol=1e-5), name


@pytest.mark.slow
def test_matches_transformers_gpt2():
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(vocab_size=41, n_positions=32, n_embd=32, n_layer=2,
                                     n_head=4, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    cfg = TransformerConfig(vocab_size=41, d_model=32, n_layers=2, n_heads=4, max_len=32,
                            positions="learned", activation="gelu_tanh", norm_placement="pre")
    lm = DecoderLM(cfg).eval()
    sd = hf.state_dict()
    ours = {"embed.tok_emb.weight": sd["transformer.wte.weight"],
            "embed.pos_emb.weight": sd["transformer.wpe.weight"],
            "final_norm.weight": sd["transformer.ln_f.weight"],
            "final_norm.bias": sd["transformer.ln_f.bias"],
            "lm_head.weight": sd["transformer.wte.weight"]}
    names = {"attn.qkv_proj": "attn.c_attn", "attn.out_proj": "attn.c_proj",
             "ffn.fc_in": "mlp.c_fc", "ffn.fc_out": "mlp.c_proj"}
    for i in range(2):
        for ln_ours, ln_hf in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
            for kind in ("weight", "bias"):
                ours[f"layers.{i}.{ln_ours}.{kind}"] = sd[f"transformer.h.{i}.{ln_hf}.{kind}"]
        for mine, theirs in names.items():
            ours[f"layers.{i}.{mine}.weight"] = sd[f"transformer.h.{i}.{theirs}.weight"].T
            ours[f"layers.{i}.{mine}.bias"] = sd[f"transformer.h.{i}.{theirs}.bias"]
    lm.load_state_dict(ours)
    idx = torch.randint(0, 41, (2, 9))
    with torch.no_grad():
        assert torch.allclose(lm(idx)[0], hf(idx).logits, atol=1e-4)


@pytest.mark.parametrize("kwargs, field", [
    (dict(positions="absolute"), "positions"), (dict(norm_placement="sandwich"), "norm_placement"),
    (dict(activation="silu"), "activation"), (dict(norm="batchnorm"), "norm"),
    (dict(n_layers=-1), "n_layers"), (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(rope_scaling="yarn"), "rope_scaling"), (dict(norm_eps=0.0), "norm_eps"),
    (dict(window=-2), "window"), (dict(max_len=0), "max_len"), (dict(bias="yes"), "bias"),
])
def test_config_rejects_bad_values(tiny, kwargs, field):
    with pytest.raises(ValueError, match=field):
        tiny(**kwargs)


def test_config_from_dict_rejects_unknown_keys():
    cfg = TransformerConfig.from_dict({"vocab_size": 10, "d_model": 16, "n_heads": 2})
    assert cfg.d_model == 16
    with pytest.raises(ValueError, match="n_layer"):
        TransformerConfig.from_dict({"vocab_size": 10, "n_layer": 2})
    with pytest.raises(ValueError, match="d_model"):
        EncoderDecoderConfig(encoder=dict(vocab_size=10, d_model=16, n_heads=2),
                             decoder=dict(vocab_size=10, d_model=32, n_heads=2))


def test_encoder_decoder_config_from_dict_builds_the_nested_configs():
    side = {"vocab_size": 10, "d_model": 16, "n_heads": 2}
    cfg = EncoderDecoderConfig.from_dict({"encoder": side, "decoder": {**side, "n_layers": 1},
                                          "share_embeddings": True})
    assert cfg.decoder == TransformerConfig(**side, n_layers=1) and cfg.share_embeddings
    with pytest.raises(ValueError, match=r"EncoderDecoderConfig has no field\(s\) \['shared'\]"):
        EncoderDecoderConfig.from_dict({"encoder": side, "decoder": side, "shared": True})
    with pytest.raises(ValueError, match=r"TransformerConfig has no field\(s\) \['n_layer'\]"):
        EncoderDecoderConfig.from_dict({"encoder": side, "decoder": {**side, "n_layer": 1}})


def test_bad_inputs_raise(tiny):
    lm, enc = DecoderLM(tiny(max_len=8)), Encoder(tiny())
    with pytest.raises(ValueError, match="vocab_size"):
        lm(torch.tensor([[1, 37]]))
    with pytest.raises(ValueError, match="idx"):
        lm(torch.randn(1, 3))
    with pytest.raises(ValueError, match="attention_mask"):
        lm(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="not both"):
        lm(torch.ones(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 3),
           lengths=torch.tensor([3]))
    with pytest.raises(ValueError, match="lengths"):
        enc(torch.ones(1, 3, dtype=torch.long), lengths=torch.tensor([4]))
    with pytest.raises(ValueError, match="targets"):
        lm(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len"):
        lm(torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="n_token_types"):
        enc(torch.ones(1, 3, dtype=torch.long), token_type_ids=torch.zeros(1, 3, dtype=torch.long))
