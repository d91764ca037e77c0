"""Splitting a corpus of one file or a handful by position: the head trains, the tail validates
and tests; caps cut the last document short; "auto" picks the mode from the file names."""

import json

import pytest

from qkv.data import SPLITS, Corpus, CorpusConfig, CorpusError, Document, split_of
from qkv.data.corpus import cut_points


def _lines(n: int, width: int = 20) -> str:
    return "".join(f"{i:0{width - 1}d}\n" for i in range(n))


def test_one_file_splits_by_position_at_line_starts(tmp_path):
    text = _lines(100)
    (tmp_path / "one.txt").write_text(text)
    corpus = Corpus.load(str(tmp_path / "one.txt"), max_bytes=None)
    assert corpus.split == "position"
    parts = [corpus.texts(s) for s in SPLITS]
    assert [len(p) for p in parts] == [1, 1, 1]
    assert "".join(p[0] for p in parts) == text  # nothing lost, nothing repeated, in order
    assert [p[0].count("\n") for p in parts] == [90, 5, 5]
    assert all(p[0].startswith("0") and p[0].endswith("\n") for p in parts)
    assert corpus.describe_split() == "by position, 90/5/5"


def test_fractions_and_explicit_document_split(tmp_path):
    (tmp_path / "one.txt").write_text(_lines(100))
    corpus = Corpus.load(str(tmp_path / "one.txt"), fractions=(0.8, 0.2, 0.0))
    assert [t.count("\n") for s in SPLITS for t in corpus.texts(s)] == [80, 20]
    assert corpus.test == []
    by_document = Corpus.load(str(tmp_path / "one.txt"), split="document")
    assert sum(len(by_document[s]) for s in SPLITS) == 1
    assert by_document[split_of("one.txt")] == [Document("one.txt", _lines(100))]


def test_a_handful_of_files_splits_by_position(tmp_path):
    for i in range(4):
        (tmp_path / f"f{i}.py").write_text(_lines(20))
    names = [f"f{i}.py" for i in range(4)]
    assert {split_of(n) for n in names} != set(SPLITS)  # by document, a split would be empty
    corpus = Corpus.load(str(tmp_path))
    assert corpus.split == "position"
    assert all(len(corpus[s]) == 4 for s in SPLITS)


def test_many_files_still_split_by_document():
    corpus = Corpus.load("stdlib", max_files=200)
    assert corpus.split == "document"
    assert all(split_of(d.name) == s for s in SPLITS for d in corpus[s])


def test_max_bytes_by_position_cuts_the_last_document_short(tmp_path):
    text = "é" * 500 + "\n" + "x" * 499  # 1500 bytes; 2-byte characters come first
    (tmp_path / "big.txt").write_text(text)
    corpus = Corpus.load(str(tmp_path / "big.txt"), max_bytes=301)
    total = "".join(t for s in SPLITS for t in corpus.texts(s))
    assert total == "é" * 150  # 300 bytes: never half a character
    assert sum(d.nbytes for s in SPLITS for d in corpus[s]) <= 301


def test_jsonl_by_position(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": _lines(20)}) for _ in range(2)) + "\n")
    assert Corpus.load(str(path)).split == "document"
    corpus = Corpus.load(str(path), split="position", max_bytes=500)
    assert [len(corpus[s]) for s in SPLITS] == [2, 2, 2]
    assert sum(d.nbytes for s in SPLITS for d in corpus[s]) == 500


@pytest.mark.parametrize("fractions", [(0.9, 0.05, 0.05), (0.5, 0.5, 0.0), (1.0, 0.0, 0.0)])
@pytest.mark.parametrize("text", ["", "no newline at all", _lines(7), "a\n\n\nb" * 13])
def test_cut_points_partition_the_text(text, fractions):
    a, b = cut_points(text, fractions)
    assert 0 <= a <= b <= len(text)
    if fractions[1] == fractions[2] == 0:
        assert a == b == len(text)


def test_bad_split_mode():
    with pytest.raises(ValueError, match="split must be one of"):
        CorpusConfig(split="random")

def test_no_text_by_position(tmp_path):
    (tmp_path / "notes.md").write_text("words")
    with pytest.raises(CorpusError, match="no non-empty"):
        Corpus.load(str(tmp_path), split="position", suffixes=(".py",))
