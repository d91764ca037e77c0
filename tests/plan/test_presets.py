"""Preset shapes reproduce the published parameter totals (counted on the meta device)."""

import pytest

from qkv.plan import PRESETS, PUBLISHED_PARAMS, count_params, load_model


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameters_match_the_published_totals(name):
    assert count_params(load_model(name)) == PUBLISHED_PARAMS[name]


def test_minilm_and_demo():
    # all-MiniLM-L6-v2 without its pooler (qkv's encoder leaves the pooler out)
    assert count_params(load_model("minilm")) == 22_713_216 - (384 * 384 + 384)
    demo = load_model("demo", seq_len=128)
    assert demo.kind == "decoder" and demo.config.max_len == 128
    assert load_model("minilm").kind == "encoder"
    llama = load_model("llama-8b").config
    assert (llama.n_kv_heads, llama.activation, llama.norm, llama.positions) == \
        (8, "swiglu", "rmsnorm", "rope")
    assert load_model("llama-1b").config.tie_embeddings
    assert set(PUBLISHED_PARAMS) < set(PRESETS)


def test_unknown_model_names_the_presets(tmp_path):
    with pytest.raises(ValueError, match="llama-70b"):
        load_model("gpt5")
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "missing.toml"))
    toml = tmp_path / "model.toml"
    toml.write_text("seq_len = 64\n[model]\nd_model = 64\nn_layers = 2\nn_heads = 2\n")
    spec = load_model(str(toml))
    assert spec.config.d_model == 64 and spec.config.max_len == 64
    assert spec.config.vocab_size == 2048


def test_a_training_config_plans_its_tokenizers_vocabulary(tmp_path):
    for tokenizer, vocab in (("byte", 258), ("bpe", 512)):
        toml = tmp_path / f"{tokenizer}.toml"
        toml.write_text(f'tokenizer = "{tokenizer}"\nvocab_size = 512\n')
        assert load_model(str(toml)).config.vocab_size == vocab
    toml = tmp_path / "proteins.toml"
    toml.write_text('corpus = "proteins"\n')
    assert load_model(str(toml)).config.vocab_size == 29  # the residue tokenizer
