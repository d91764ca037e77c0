"""Tokenizers: byte fallback and byte-level BPE; exact round trips, specials, save/load."""

import errno
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.data import EOS, Corpus, Tokenizer, byte_tokenizer, train_bpe


@pytest.fixture(scope="module")
def corpus():
    return Corpus.load("stdlib", max_bytes=300_000)


@pytest.fixture(scope="module")
def bpe(corpus):
    return train_bpe(corpus.texts("train"), vocab_size=512)


def test_byte_tokenizer_ids_are_bytes():
    tok = byte_tokenizer()
    text = "héllo 🙂\r\n\t\x00"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
    assert tok.decode(tok.encode(text)) == text


def test_bpe_vocab_and_compression(bpe, corpus):
    assert bpe.vocab_size == 512
    assert {bpe.eos_id, bpe.pad_id} == {0, 1}
    text = "".join(corpus.texts("validation"))
    ids = bpe.encode(text)
    assert max(ids) < 512 and min(ids) >= 2
    assert len(text.encode()) / len(ids) > 1.7  # merges learned on train help on validation
    assert bpe.decode(ids) == text


def test_bpe_training_is_deterministic(corpus, bpe):
    again = train_bpe(corpus.texts("train"), vocab_size=512)
    assert again.hf.get_vocab() == bpe.hf.get_vocab()


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_round_trip_bytes(text):
    tok = byte_tokenizer()
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(text=st.text())
def test_round_trip_bpe(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@settings(max_examples=50, deadline=None)
@given(texts=st.lists(st.text(), max_size=5))
def test_encode_batch_matches_encode(bpe, texts):
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]


@pytest.mark.parametrize("make", ["bytes", "bpe"])
def test_special_tokens_never_come_from_text(bpe, make):
    tok = byte_tokenizer() if make == "bytes" else bpe
    text = f"a{EOS}b <|pad|>"
    ids = tok.encode(text)
    assert tok.eos_id not in ids and tok.pad_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode([*tok.encode("x"), tok.eos_id]) == "x" + EOS
    assert tok.decode([*tok.encode("x"), tok.eos_id, tok.pad_id], skip_special_tokens=True) == "x"


@pytest.mark.parametrize("make", ["bytes", "bpe"])
def test_save_load(tmp_path, bpe, make):
    tok = byte_tokenizer() if make == "bytes" else bpe
    tok.save(tmp_path)  # a directory: writes tokenizer.json inside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]
    for loaded in (Tokenizer.load(tmp_path), Tokenizer.load(tmp_path / "tokenizer.json")):
        text = f"def f(x):\n    return x  # ünï {EOS}"
        assert loaded.encode(text) == tok.encode(text)
        assert (loaded.vocab_size, loaded.eos_id, loaded.pad_id) == (
            tok.vocab_size, tok.eos_id, tok.pad_id)
        assert loaded.decode(loaded.encode(text)) == text


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be at least 258"):
        train_bpe(["abc"], vocab_size=100)
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "nothing.json")


@pytest.mark.parametrize("make", ["bytes", "bpe"])
def test_byte_lengths_spell_the_bytes_of_each_token(bpe, make):
    tok = byte_tokenizer() if make == "bytes" else bpe
    lengths = tok.byte_lengths()
    assert len(lengths) == tok.vocab_size
    assert lengths[tok.eos_id] == lengths[tok.pad_id] == 0
    assert all(n >= 1 for i, n in enumerate(lengths) if i not in (tok.eos_id, tok.pad_id))
    text = "def f(x):\n    return 'ünï 🙂'\n"
    assert sum(lengths[i] for i in tok.encode(text)) == len(text.encode("utf-8"))


def test_save_is_atomic_and_durable(tmp_path, monkeypatch):
    import qkv.io

    tok = byte_tokenizer()
    target = tmp_path / "tokenizer.json"
    target.write_text("old")
    synced = []
    monkeypatch.setattr(qkv.io, "fsync_dir", synced.append)

    def broken(path):
        Path(path).write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(tok.hf, "save", broken, raising=False)
    with pytest.raises(OSError, match="disk full"):
        tok.save(target)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "tokenizer.json"]
    monkeypatch.undo()
    monkeypatch.setattr(qkv.io, "fsync_dir", synced.append)
    tok.save(target)
    assert Tokenizer.load(target).vocab_size == 258 and synced == [tmp_path]


@pytest.mark.parametrize("failure, number, words", [
    (Exception("No space left on device (os error 28)"), errno.ENOSPC, "No space left"),
    (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC, "No space left"),
    (Exception("Permission denied (os error 13)"), None, "Permission denied (os error 13)"),
])
def test_a_failed_save_is_an_os_error_naming_the_file(tmp_path, monkeypatch, failure, number,
                                                      words):
    tok = byte_tokenizer()

    def broken(path):
        Path(path).write_text("half")
        raise failure  # the tokenizers library raises a plain Exception, not an OSError

    monkeypatch.setattr(tok.hf, "save", broken, raising=False)
    with pytest.raises(OSError) as e:
        tok.save(tmp_path)
    target = tmp_path / "tokenizer.json"
    assert e.value.errno == number and words in str(e.value)
    assert str(target) in str(e.value) and ".tmp" not in str(e.value)
    assert list(tmp_path.iterdir()) == []
