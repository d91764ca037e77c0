"""The residue tokenizer, the built-in protein corpus, sequence examples, the per-residue
baselines and bits per residue."""

import math
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.data import (
    RESIDUES,
    Corpus,
    CorpusError,
    ResidueTokenizer,
    Tokenizer,
    bits_per_residue,
    is_protein_source,
    ngram_bits_per_residue,
    padding_fractions,
    residue_tokenizer,
    sequence_examples,
    split_of,
)
from qkv.data import proteins as proteins_module
from qkv.data.batching import IGNORE_INDEX
from qkv.data.proteins import pad_examples


@pytest.fixture(scope="module")
def tok():
    return residue_tokenizer()


def test_vocabulary(tok):
    assert tok.vocab_size == 29 == len(RESIDUES) + 3
    assert (tok.eos_id, tok.pad_id, tok.unk_id) == (0, 1, 2)
    assert tok.encode("ACDEFGHIKLMNPQRSTVWY") == list(range(3, 23))
    assert tok.encode("BZJXUO") == list(range(23, 29))


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=RESIDUES + RESIDUES.lower(), max_size=200))
def test_round_trip_uppercases(tok, text):
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text.upper()
    assert tok.encode(text.lower()) == ids


def test_unknown_characters_are_unk_one_each(tok):
    assert tok.encode("M1*K -") == [tok.encode("M")[0], 2, 2, tok.encode("K")[0], 2, 2]
    assert tok.encode("\u00e9\n") == [2, 2]
    assert tok.decode(tok.encode("M?K")) == "M<unk>K"
    assert tok.decode(tok.encode("M?K"), skip_special_tokens=True) == "MK"


def test_specials_never_come_from_text(tok):
    ids = tok.encode("<|endoftext|>")
    assert tok.eos_id not in ids and tok.pad_id not in ids
    assert tok.decode([0, *tok.encode("MK"), 1]) == "<|endoftext|>MK<|pad|>"


def test_byte_lengths_make_bits_per_byte_bits_per_residue(tok):
    lengths = tok.byte_lengths()
    assert lengths[:3] == [0, 0, 1] and lengths[3:] == [1] * 26


def test_save_and_load_give_the_residue_tokenizer(tok, tmp_path):
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert isinstance(loaded, ResidueTokenizer)
    assert loaded.encode("mkvX*") == tok.encode("MKVX*")
    assert loaded.byte_lengths() == tok.byte_lengths()
    from tokenizers import Tokenizer as HF

    hf = HF.from_file(str(tmp_path / "tokenizer.json"))  # a standard tokenizer.json
    assert hf.encode("mk").ids == tok.encode("MK")


def test_builtin_corpus():
    corpus = Corpus.load("proteins")
    lengths = [len(d.text) for s in ("train", "validation", "test") for d in corpus[s]]
    assert len(lengths) == 2100 and (min(lengths), max(lengths)) == (32, 4559)
    assert sum(lengths) == 680_484 and int(np.median(lengths)) == 276
    assert all(split_of(d.name) == "test" for d in corpus.test)
    assert "2,099 terminal '*' stops removed" in corpus.summary
    assert is_protein_source("proteins") and not is_protein_source("stdlib")


def test_builtin_corpus_checks_its_sha256(tmp_path, monkeypatch):
    copy = tmp_path / "pkg"
    target = copy / proteins_module.BUILTIN_FILE
    target.parent.mkdir(parents=True)
    shutil.copy(proteins_module.builtin_path(), target)
    with target.open("a") as f:
        f.write(">extra\nMK\n")

    class Spec:
        submodule_search_locations = [str(copy)]

    monkeypatch.setattr(proteins_module.importlib.util, "find_spec", lambda name: Spec)
    with pytest.raises(CorpusError, match="sha256 of .* expected 7190c967"):
        Corpus.load("proteins")
    monkeypatch.setattr(proteins_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install pyhmmer==0.12.3"):
        Corpus.load("proteins")


def test_sequence_examples_and_padding():
    examples = sequence_examples([[5, 6, 7], [8]], eos_id=0, max_len=10)
    assert [e.tolist() for e in examples] == [[0, 5, 6, 7, 0], [0, 8, 0]]
    pieces = sequence_examples([[5, 6, 7, 8, 9]], eos_id=0, max_len=3)
    assert [p.tolist() for p in pieces] == [[0, 5, 6, 7], [7, 8, 9, 0]]
    x, y = pad_examples(examples, pad_id=1)
    assert x.tolist() == [[0, 5, 6, 7], [0, 8, 1, 1]]
    assert y.tolist() == [[5, 6, 7, 0], [8, 0, IGNORE_INDEX, IGNORE_INDEX]]


def test_padding_fractions_bucketing_pads_less():
    lengths = np.random.default_rng(0).integers(30, 3000, size=500).tolist()
    result = padding_fractions(lengths, batch_size=16, max_tokens=8192, seed=0)
    assert 0 <= result["bucketed"] < 0.1 < result["random"] < 1


def test_ngram_baselines_by_hand():
    # Train: one sequence "ab" (ids 1, 2) with eos 0; vocab 3; alpha 1.
    train, test = [[1, 2]], [[1, 2]]
    got = ngram_bits_per_residue(train, test, vocab_size=3, eos_id=0, alpha=1.0)
    # Unigram counts of the predictions (1, 2, 0) + 1: 2/6 each.
    assert got["unigram"] == pytest.approx(3 * math.log2(3) / 2)
    # Bigram rows (0 -> 1), (1 -> 2), (2 -> 0): each 2/4 after smoothing.
    assert got["bigram"] == pytest.approx(3 * 1.0 / 2)


class _Constant(torch.nn.Module):
    """Uniform logits over V ids: every prediction costs log2(V) bits."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, x):
        return torch.zeros(*x.shape, self.vocab), None


def test_bits_per_residue_scores_every_prediction_once():
    seqs = [[3] * 7, [4] * 40, [5]]
    got = bits_per_residue(_Constant(29), seqs, eos_id=0, pad_id=1, max_len=16, max_tokens=32)
    assert got["predictions"] == 48 + 3 and got["residues"] == 48
    assert got["bits_per_residue"] == pytest.approx(math.log2(29) * 51 / 48)
