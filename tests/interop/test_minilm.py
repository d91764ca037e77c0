"""all-MiniLM-L6-v2 on qkv's encoder against sentence-transformers, and the loader's errors."""

import shutil
import subprocess
import sys

import pytest
import torch

import qkv
from qkv.interop.bert import bert_config, convert_bert_state
from qkv.interop.minilm import MODEL_SHA256, TextTooLongError, load_minilm, model_dir
from qkv.interop.weights import WeightsError, read_json

TOL = 1e-5


@pytest.mark.parametrize("backend, packed", [
    ("reference", True), ("chunked", True), ("sdpa", True), ("reference", False),
], ids=["reference-packed", "chunked-packed", "sdpa-packed", "reference-padded"])
def test_matches_sentence_transformers(minilm, texts, st_embeddings, backend, packed):
    """Packed: the Encoder with cu_seqlens, no padding. Padded: lengths mark the padding."""
    ours = minilm.encode(texts, batch_size=8, backend=backend, packed=packed)
    assert ours.shape == (len(texts), 384) and ours.dtype == torch.float32
    diff = (ours - st_embeddings).abs().max().item()
    print(f"{backend} {'packed' if packed else 'padded'}: max abs diff {diff:.2e}")
    assert diff < TOL, f"{backend}: max abs diff {diff:.2e}"


def test_embed_is_exported_lazily_and_matches(texts, st_embeddings):
    out = qkv.embed(texts[:20], batch_size=4, device="cpu")  # backend auto
    assert out.shape == (20, 384)
    torch.testing.assert_close(out, st_embeddings[:20], atol=TOL, rtol=0)
    assert torch.allclose(out.norm(dim=-1), torch.ones(20), atol=1e-6)
    assert "embed" in qkv.__all__
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        qkv.nonexistent  # noqa: B018


def test_import_qkv_stays_light():
    code = ("import sys, qkv; heavy = [m for m in ('qkv.interop.minilm', 'tokenizers', "
            "'transformers', 'safetensors') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_padding_and_batching_do_not_change_vectors(minilm, texts):
    short, long = texts[4], texts[21]
    alone = minilm.encode([short], batch_size=1, backend="chunked")
    padded = minilm.encode([long, short], batch_size=2, backend="chunked")  # short is padded
    torch.testing.assert_close(padded[1:], alone, atol=1e-6, rtol=0)
    by_one = minilm.encode(texts[:10], batch_size=1, backend="sdpa")
    by_four = minilm.encode(texts[:10], batch_size=4, backend="sdpa")
    torch.testing.assert_close(by_one, by_four, atol=1e-6, rtol=0)


def test_order_is_restored(minilm, texts):
    forward = minilm.encode(texts[:12], batch_size=5)
    backward = minilm.encode(texts[:12][::-1], batch_size=5)
    torch.testing.assert_close(backward.flip(0), forward, atol=1e-6, rtol=0)


def test_truncation_and_over_long_input(minilm, texts):
    over = texts[23]
    assert len(minilm.tokenize([over])[0]) == 256
    batch = ["short", "also short", over, "fine"]
    with pytest.raises(TextTooLongError, match=r"^text 3 of 4 has \d+ tokens; the limit is 256 ") \
            as caught:
        minilm.encode(batch, truncate=False)
    error = caught.value
    assert isinstance(error, ValueError)
    assert (error.index, error.limit) == (2, 256) and error.length > 256
    minilm.tokenizer.no_truncation()
    assert error.length == len(minilm.tokenizer.encode(over).ids)
    minilm.encode([texts[22]], truncate=False)  # ~200 tokens fit


def test_any_iterable_of_texts_is_read_once(minilm, texts):
    want = minilm.encode(texts[:6], batch_size=4)
    got = qkv.embed((text for text in texts[:6]), batch_size=4, device="cpu")
    assert got.shape == (6, 384)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(minilm.encode(iter(texts[:6]), batch_size=4), want)
    torch.testing.assert_close(minilm.encode(tuple(texts[:6]), batch_size=4), want)


def test_edge_inputs(minilm):
    assert minilm.encode([]).shape == (0, 384)
    assert minilm.encode("one text").shape == (1, 384)
    with pytest.raises(ValueError, match=r"texts\[1\] must be a str"):
        minilm.encode(["ok", 3])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        minilm.encode(["ok"], batch_size=0)
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda'.*'gpu0'"):
        qkv.embed(["ok"], device="gpu0")


def _folder_with(tmp_path, weights: bytes | None = None):
    src = model_dir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(src / name, tmp_path / name)
    if weights is None:
        (tmp_path / "model.safetensors").symlink_to(src / "model.safetensors")
    else:
        (tmp_path / "model.safetensors").write_bytes(weights)
    return tmp_path


def test_sha_mismatch_is_refused(tmp_path):
    from safetensors.torch import save

    folder = _folder_with(tmp_path, save({"x": torch.zeros(2)}))
    with pytest.raises(WeightsError, match=f"sha256 of .*model.safetensors.*{MODEL_SHA256}"):
        load_minilm(folder, device="cpu")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_minilm(tmp_path, device="cpu")


@pytest.fixture(scope="module")
def bert_state():
    from safetensors.torch import load_file

    return load_file(str(model_dir() / "model.safetensors"))


@pytest.fixture(scope="module")
def bert_cfg():
    return read_json(model_dir() / "config.json")


def test_missing_tensor_is_named(bert_state, bert_cfg):
    state = dict(bert_state)
    del state["encoder.layer.3.attention.self.key.bias"]
    with pytest.raises(WeightsError, match=r"missing tensor\(s\) \['encoder.layer.3.attention"
                                           r".self.key.bias'\]"):
        convert_bert_state(state, bert_cfg)


def test_unexpected_tensor_is_named(bert_state, bert_cfg):
    state = {**bert_state, "encoder.layer.0.extra.weight": torch.zeros(3)}
    with pytest.raises(WeightsError, match=r"unexpected tensor\(s\) \['encoder.layer.0.extra"):
        convert_bert_state(state, bert_cfg)


def test_misshaped_tensor_is_named(bert_state, bert_cfg):
    state = {**bert_state, "encoder.layer.2.output.dense.weight": torch.zeros(384, 1000)}
    with pytest.raises(WeightsError, match=r"encoder.layer.2.output.dense.weight has shape "
                                           r"\(384, 1000\).*\(384, 1536\)"):
        convert_bert_state(state, bert_cfg)


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", 768, r"embeddings.word_embeddings.weight has shape \(30522, 384\), but the "
                         r"config's \(vocab_size, hidden_size\) make it \(30522, 768\)"),
    ("num_hidden_layers", 4, "num_hidden_layers=4 does not fit the weights, which hold 6 layers"),
    ("intermediate_size", 1000, r"intermediate.dense.weight has shape \(1536, 384\)"),
    ("hidden_act", "relu", "hidden_act='relu' is not supported"),
    ("position_embedding_type", "relative_key", "position_embedding_type"),
    ("num_attention_heads", 5, "n_heads"),
    ("model_type", "gpt2", "model_type must be 'bert'"),
])
def test_config_that_does_not_fit_is_named(bert_state, bert_cfg, field, value, message):
    with pytest.raises(WeightsError, match=message):
        convert_bert_state(bert_state, {**bert_cfg, field: value})


def test_config_missing_field(bert_cfg):
    cfg = dict(bert_cfg)
    del cfg["layer_norm_eps"]
    with pytest.raises(WeightsError, match=r"lacks field\(s\) \['layer_norm_eps'\]"):
        bert_config(cfg)


def test_small_random_bert_matches_transformers():
    """Any BERT size, and token type ids, through the general loader."""
    from transformers import BertConfig, BertModel

    from qkv.interop.bert import load_bert

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=40, type_vocab_size=3,
                     layer_norm_eps=1e-7)
    hf = BertModel(cfg).eval()
    ours = load_bert(hf.state_dict(), cfg)
    ids = torch.randint(0, 50, (3, 11))
    types = torch.randint(0, 3, (3, 11))
    lengths = torch.tensor([11, 7, 2])
    mask = (torch.arange(11) < lengths[:, None]).long()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = ours(ids, lengths=lengths, token_type_ids=types)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(got[b, :n], want[b, :n], atol=1e-5, rtol=0)
