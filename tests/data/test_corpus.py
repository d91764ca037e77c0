"""Corpora: the stdlib default, folders, globs, JSONL; splits by path hash; caps; errors."""

import json

import pytest

from qkv.data import SPLITS, Corpus, CorpusConfig, CorpusError, Document, split_of, stdlib_files


@pytest.fixture(scope="module")
def small_stdlib():
    return Corpus.load("stdlib", max_bytes=400_000)


def test_split_of_is_pinned_and_near_the_fractions():
    # sha256 of the name, so the same on every machine: a change here reshuffles every corpus.
    got = {n: split_of(n) for n in ("os.py", "typing.py", "f3.py", "f26.py", "f35.py")}
    assert got == {"os.py": "test", "typing.py": "train", "f3.py": "test",
                   "f26.py": "validation", "f35.py": "validation"}
    names = [f"dir/file_{i}.py" for i in range(4000)]
    counts = {s: sum(split_of(n) == s for n in names) for s in SPLITS}
    assert 0.88 < counts["train"] / 4000 < 0.92
    assert 0.035 < counts["validation"] / 4000 < 0.065
    assert split_of("os.py", (1.0, 0.0, 0.0)) == "train"
    assert split_of("typing.py", (0.0, 0.0, 1.0)) == "test"


def test_stdlib_files_skip_tests_generated_and_third_party():
    names = [n for n, _ in stdlib_files()]
    assert len(names) > 300
    assert "os.py" in names and "json/decoder.py" in names
    assert all(n.endswith(".py") for n in names)
    for n in names:
        parts = n.split("/")
        assert not {"test", "tests", "idle_test", "site-packages", "encodings",
                    "pydoc_data"} & set(parts), n
        assert not parts[-1].startswith("_sysconfigdata_"), n
    train = sum(split_of(n) == "train" for n in names) / len(names)
    assert 0.85 < train < 0.95


def test_stdlib_corpus_within_cap_and_deterministic(small_stdlib):
    stats = small_stdlib.stats()
    assert all(stats[s]["files"] >= 1 for s in SPLITS)
    assert sum(v["bytes"] for v in stats.values()) <= 400_000
    again = Corpus.load("stdlib", max_bytes=400_000)
    for s in SPLITS:
        assert [d.name for d in small_stdlib[s]] == [d.name for d in again[s]]
        assert all(split_of(d.name) == s for d in small_stdlib[s])
    names = [d.name for s in SPLITS for d in small_stdlib[s]]
    assert len(names) == len(set(names))
    assert repr(small_stdlib).startswith("Corpus(train=")


def test_max_files_takes_a_prefix_of_a_fixed_order():
    small, large = Corpus.load(max_files=20), Corpus.load(max_files=40)
    assert sum(v["files"] for v in small.stats().values()) == 20
    for s in SPLITS:
        assert {d.name for d in small[s]} <= {d.name for d in large[s]}
        assert small[s]


def _write(root, files):
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())


def test_folder_and_glob(tmp_path):
    _write(tmp_path, {"a.txt": "alpha", "sub/b.txt": "béta", "sub/c.md": "gamma",
                      ".hidden/d.txt": "x", "empty.txt": "", "bom.txt": b"\xef\xbb\xbfbom"})
    corpus = Corpus.load(str(tmp_path), fractions=(1.0, 0.0, 0.0))
    docs = {d.name: d.text for d in corpus.train}
    assert docs == {"a.txt": "alpha", "sub/b.txt": "béta", "sub/c.md": "gamma", "bom.txt": "bom"}
    only_txt = Corpus.load(str(tmp_path), suffixes=(".txt",), fractions=(1.0, 0.0, 0.0))
    assert {d.name for d in only_txt.train} == {"a.txt", "sub/b.txt", "bom.txt"}
    globbed = Corpus.load(str(tmp_path / "**" / "*.txt"), fractions=(1.0, 0.0, 0.0))
    assert {d.name for d in globbed.train} == {"a.txt", "sub/b.txt", "bom.txt"}
    single = Corpus.load(str(tmp_path / "a.txt"), fractions=(1.0, 0.0, 0.0))
    assert single.train == [Document("a.txt", "alpha")]


def test_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"text": "one"}, {"text": "two", "id": 2}, {"text": ""}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    corpus = Corpus.load(str(path), fractions=(1.0, 0.0, 0.0))
    assert [(d.name, d.text) for d in corpus.train] == [("data.jsonl:1", "one"),
                                                       ("data.jsonl:2", "two")]
    path.write_text(json.dumps({"content": "x"}) + "\n")
    assert Corpus.load(str(path), text_key="content", fractions=(1, 0, 0)).train[0].text == "x"


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', "{not json"], "line 2 is not valid JSON"),
    (['{"text": "ok"}', '{"body": "x"}'], "line 2 has no field 'text'"),
    (['{"text": 3}'], "line 1: field 'text' is int"),
    (['["text"]'], "line 1 is not a JSON object"),
])
def test_jsonl_errors_name_the_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError, match=message):
        Corpus.load(str(path))


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Corpus.load(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no non-empty text"):
        Corpus.load(str(tmp_path / "empty"))
    with pytest.raises(CorpusError, match="matches no files"):
        Corpus.load(str(tmp_path / "*.nothing"))
    _write(tmp_path / "bin", {"ok.txt": "fine", "blob.bin": b"ab\x00cd"})
    with pytest.raises(CorpusError, match=r"blob\.bin is not a text file"):
        Corpus.load(str(tmp_path / "bin"))
    _write(tmp_path / "latin", {"latin.txt": "café".encode("latin-1")})
    with pytest.raises(CorpusError, match=r"latin\.txt is not UTF-8"):
        Corpus.load(str(tmp_path / "latin"))
    with pytest.raises(ValueError, match="fractions"):
        CorpusConfig(fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="max_bytes"):
        CorpusConfig(max_bytes=0)
    with pytest.raises(TypeError):
        Corpus.load("stdlib", max_filez=3)
    with pytest.raises(KeyError, match="unknown split"):
        Corpus([Document("a", "b")])["dev"]
