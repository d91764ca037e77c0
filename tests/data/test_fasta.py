"""FASTA parsing: what is accepted, what is counted, and the errors that name file and line."""

import gzip

import pytest

from qkv.data import Corpus, CorpusError, is_fasta_path, parse_fasta, read_fasta


def _write(tmp_path, text: str, name: str = "seqs.fa"):
    path = tmp_path / name
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def test_records_ids_descriptions_and_wrapped_lines():
    records, summary = parse_fasta([">sp|P1 first protein", "MKV", "LLA", "", ">P2", "ACD*"])
    assert [(r.id, r.description, r.sequence, r.line) for r in records] == [
        ("sp|P1", "first protein", "MKVLLA", 1), ("P2", "", "ACD", 5)]
    assert (summary.records, summary.residues, summary.stops_removed) == (2, 9, 1)


def test_lowercase_whitespace_and_crlf_are_normalised_and_counted():
    records, summary = parse_fasta([">a\r", "mk v\tx \r", "  AC  "])
    assert records[0].sequence == "MKVXAC"
    assert summary.uppercased == 4
    assert "4 lowercase residues uppercased" in summary.describe()


def test_every_letter_is_a_residue():
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    records, _ = parse_fasta([">all", letters, letters.lower()])
    assert records[0].sequence == letters * 2


@pytest.mark.parametrize("lines, where, says", [
    ([], "none of its 0 line(s)", "holds no sequences"),
    (["", "  "], "none of its 2 line(s)", "holds no sequences"),
    (["MKV"], "x.fa line 1", "residues before the first '>' header"),
    ([">a", "MK", ">b", ">c", "AC"], "x.fa line 3", "header of 'b' has no residues"),
    ([">a", "MK", ">b"], "x.fa line 3", "header of 'b' has no residues"),
    ([">", "MK"], "x.fa line 1", "has no sequence id"),
    ([">a", "MK", ">a", "AC"], "x.fa line 3", "repeats the header on line 1"),
    ([">a", "MK1V"], "x.fa line 2, column 3", "'1' is not a residue letter"),
    ([">a", "MK-V"], "x.fa line 2, column 3", "gap '-'"),
    ([">a", "MK.V"], "x.fa line 2, column 3", "gap '.'"),
    ([">a", "M K*V"], "x.fa line 2, column 4", "'*' stop inside the sequence"),
    ([">a", "MK*", "AC"], "x.fa line 2, column 3", "'*' stop inside the sequence"),
    ([">a", "MK**"], "x.fa line 2, column 3", "'*' stop inside the sequence"),
    # columns count the line's leading whitespace
    ([">a", "   MK1V"], "x.fa line 2, column 6", "'1' is not a residue letter"),
    ([">a", "\t M K-"], "x.fa line 2, column 6", "gap '-'"),
    ([">a", "  MK*", "AC"], "x.fa line 2, column 5", "'*' stop inside the sequence"),
])
def test_bad_input_names_the_line(lines, where, says):
    with pytest.raises(CorpusError) as e:
        parse_fasta(lines, "x.fa")
    assert where in str(e.value) and says in str(e.value)
    assert str(e.value).startswith("x.fa")


def test_read_plain_and_gzip_files(tmp_path):
    text = ">a desc\nMKV*\n>b\nac\n"
    for name in ("p.fa", "p.fasta", "p.faa", "p.fa.gz", "p.FASTA.gz"):
        records, summary = read_fasta(_write(tmp_path, text, name))
        assert [r.sequence for r in records] == ["MKV", "AC"]
        assert (summary.stops_removed, summary.uppercased) == (1, 2)


def test_lines_end_at_newlines_only(tmp_path):
    # \x0c, \x0b, \x1c and \u2028 are not line ends to an editor: the '1' is on line 4.
    text = ">a\r\nMK\x0cV\r\nAC\x0bD\u2028E\x1cF\nMK1\n"
    with pytest.raises(CorpusError, match=r"x.fa line 4, column 3: '1'"):
        read_fasta(_write(tmp_path, text, "x.fa"))
    records, _ = read_fasta(_write(tmp_path, text.replace("MK1", "MKL"), "y.fa"))
    assert records[0].sequence == "MKVACDEFMKL"
    with pytest.raises(CorpusError, match="none of its 2 line"):  # a final newline ends line 2
        read_fasta(_write(tmp_path, "\n\n", "z.fa"))


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.fa"):
        read_fasta(tmp_path / "missing.fa")
    empty = _write(tmp_path, "", "empty.fa")
    with pytest.raises(CorpusError, match=f"{empty} holds no sequences"):
        read_fasta(empty)
    bad_gz = tmp_path / "bad.fa.gz"
    bad_gz.write_bytes(b"not gzip at all")
    with pytest.raises(CorpusError, match="bad.fa.gz is not a readable gzip file"):
        read_fasta(bad_gz)
    binary = tmp_path / "bin.fa"
    binary.write_bytes(b">a\nMK\x00V\n")
    with pytest.raises(CorpusError, match="bin.fa is not a text file"):
        read_fasta(binary)
    latin = tmp_path / "latin.fa"
    latin.write_bytes(">a caf\u00e9\nMK\n".encode("latin-1"))
    with pytest.raises(CorpusError, match="latin.fa line 1 is not UTF-8"):
        read_fasta(latin)
    no_residues = _write(tmp_path, ">a\nMK\n>lonely\n", "lonely.faa")
    with pytest.raises(CorpusError, match="lonely.faa line 3: header of 'lonely'"):
        read_fasta(no_residues)


def test_is_fasta_path():
    for name in ("a.fa", "a.fasta", "a.faa", "dir/a.FA", "a.fa.gz", "a.faa.gz"):
        assert is_fasta_path(name), name
    for name in ("a.txt", "a.gz", "a.jsonl", "fa", "a.fa.zip", "proteins"):
        assert not is_fasta_path(name), name


def test_fasta_corpus_splits_by_sequence_id(tmp_path):
    lines = [line for i in range(200) for line in (f">seq{i}", "MKV" * (1 + i % 5))]
    path = _write(tmp_path, "\n".join(lines) + "\n", "many.fa")
    corpus = Corpus.load(str(path))
    from qkv.data import split_of

    for split in ("train", "validation", "test"):
        assert corpus[split], split
        assert all(split_of(d.name) == split for d in corpus[split])
    assert sum(len(corpus[s]) for s in ("train", "validation", "test")) == 200
    assert "200 sequences" in corpus.summary
    capped = Corpus.load(str(path), max_files=20)
    assert "left out by max_files/max_bytes" in capped.summary
    with pytest.raises(ValueError, match="'position' would cut"):
        Corpus.load(str(path), split="position")
