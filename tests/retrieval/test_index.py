"""qkv.retrieval.index: the on-disk format, reuse, crash safety and bad inputs, with a fake
encoder (the mechanics do not depend on the model; test_search.py uses the real one)."""

import contextlib
import hashlib
import json
import os
import zlib

import pytest
import torch
from safetensors.torch import save

from qkv.io import sha256_file
from qkv.retrieval import Index, IndexFormatError, build_index, index_texts, load_index
from qkv.retrieval import index as index_module

DOCS = {
    "cats.md": "# Cats\n\nCats purr and sleep most of the day.\n\nThey hunt mice at night.\n",
    "tea.txt": "Green tea is steeped briefly in water below boiling.\n\nBlack tea takes longer.\n",
    "code.py": "import os\n\n\ndef walk(path):\n    return list(os.walk(path))\n\n\n"
               "class Tree:\n    pass\n",
}


class FakeEncoder:
    """Hashed bag of words -> unit vector; counts the texts it embeds."""

    def __init__(self, sha256="f" * 64, dim=16, max_length=256):
        self.dim, self.max_length = dim, max_length
        self.identity = {"name": "fake", "sha256": sha256, "dim": dim, "max_length": max_length}
        self.embedded = 0

    def count_tokens(self, texts):
        return [len(t.split()) for t in texts]

    def tokenize(self, texts, truncate=True):
        rows = [[zlib.crc32(w.encode()) for w in t.split()] for t in texts]
        return [[1] + row[:self.max_length - 2] + [2] for row in rows]

    def encode_ids(self, ids, batch_size=32, backend="auto", progress=None, packed=True):
        self.embedded += len(ids)
        out = torch.zeros(len(ids), self.dim)
        for i, row in enumerate(ids):
            for token in row:
                out[i, token % self.dim] += 1
        if progress is not None:
            progress(len(ids))
        return torch.nn.functional.normalize(out, dim=-1)


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def assert_same(a: Index, b: Index) -> None:
    assert a.passages == b.passages
    assert torch.equal(a.vectors, b.vectors)
    assert (a.model, a.settings, a.files) == (b.model, b.settings, b.files)


def test_round_trip_and_the_format_on_disk(corpus, tmp_path):
    out = tmp_path / "index"
    built = build_index([corpus], out, encoder=FakeEncoder())
    loaded = load_index(out)
    assert_same(built, loaded)
    assert loaded.folder == out and len(loaded) == len(loaded.vectors) > 3
    assert sorted(f["path"].rsplit("/", 1)[1] for f in built.files) == sorted(DOCS)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "qkv-index" and manifest["version"] == 1
    assert manifest["model"] == FakeEncoder().identity
    assert manifest["settings"] == {"max_tokens": 200, "overlap": 32, "splitter": 1}
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["manifest.json", manifest["data"]["vectors"]["path"],
                            manifest["data"]["passages"]["path"]])
    for entry in manifest["data"].values():
        assert sha256_file(out / entry["path"]) == entry["sha256"]
    for row in manifest["files"]:
        text = (corpus / row["path"].rsplit("/", 1)[1]).read_text()
        for p in loaded.passages[row["first"]:row["first"] + row["count"]]:
            assert p.file == row["path"] and text[p.start:p.end] == p.text


def test_in_memory_index_matches_the_built_one(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(corpus)
    built = build_index(sorted(DOCS), encoder=FakeEncoder())
    assert built.folder is None and not list(corpus.glob("manifest.json"))
    in_memory = index_texts({name: DOCS[name] for name in sorted(DOCS)}, encoder=FakeEncoder())
    assert_same(built, in_memory)
    target = next(p for p in in_memory.passages if "purr" in p.text)
    scores, ids = in_memory.rank([target.embed_text], k=2)
    assert in_memory.passages[ids[0, 0]] == target and scores.shape == (1, 2)
    assert scores[0, 0] == pytest.approx(1.0)


def test_paths_are_relative_under_the_current_folder_and_absolute_elsewhere(corpus, tmp_path,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = build_index(["docs/cats.md", corpus / "tea.txt"], encoder=FakeEncoder()).files
    assert [r["path"] for r in rows] == ["docs/cats.md", "docs/tea.txt"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rows = build_index([corpus / "cats.md"], encoder=FakeEncoder()).files
    assert rows[0]["path"] == (corpus / "cats.md").as_posix()


def test_folders_are_walked_for_known_suffixes_and_hidden_ones_left_out(corpus, tmp_path):
    (corpus / "data.csv").write_text("a,b\n1,2\n")
    (corpus / ".hidden").mkdir()
    (corpus / ".hidden" / "secret.md").write_text("hidden words\n")
    (corpus / "sub").mkdir()
    (corpus / "sub" / "more.rst").write_text("More text here.\n")
    named = tmp_path / "notes.log"
    named.write_text("A file named explicitly is indexed whatever its suffix.\n")
    index = build_index([corpus, named, corpus / "cats.md"], encoder=FakeEncoder())
    names = [os.path.relpath(r["path"], corpus) for r in index.files]
    assert names == ["cats.md", "code.py", os.path.join("sub", "more.rst"), "tea.txt",
                     os.path.join("..", "notes.log")]  # cats.md named twice, indexed once


def test_a_second_build_reuses_unchanged_files(corpus, tmp_path):
    out = tmp_path / "index"
    encoder = FakeEncoder()
    first = build_index([corpus], out, encoder=encoder)
    assert encoder.embedded == len(first) and first.report.reused == []
    encoder.embedded = 0
    again = build_index([corpus], out, encoder=encoder)
    assert encoder.embedded == 0 and len(again.report.reused) == 3
    assert_same(again, first)

    (corpus / "tea.txt").write_text("Oolong tea is partly oxidised.\n")
    (corpus / "code.py").unlink()
    changed = build_index([corpus], out, encoder=encoder)
    tea = [p for p in changed.passages if p.file.endswith("tea.txt")]
    assert encoder.embedded == len(tea) == 1
    assert [p.rsplit("/", 1)[1] for p in changed.report.embedded] == ["tea.txt"]
    assert not any(p.file.endswith("code.py") for p in changed.passages)
    cats = [i for i, p in enumerate(changed.passages) if p.file.endswith("cats.md")]
    old_cats = [i for i, p in enumerate(first.passages) if p.file.endswith("cats.md")]
    assert torch.equal(changed.vectors[cats], first.vectors[old_cats])
    assert_same(load_index(out), changed)
    assert len(list(out.iterdir())) == 3  # the replaced data files are gone


@pytest.mark.parametrize("change", [{"encoder": FakeEncoder(sha256="e" * 64)},
                                    {"max_tokens": 100}, {"overlap": 8}])
def test_a_new_model_or_settings_re_embed_everything(change, corpus, tmp_path):
    out = tmp_path / "index"
    first = build_index([corpus], out, encoder=FakeEncoder())
    encoder = change.pop("encoder", FakeEncoder())
    build_index([corpus], out, encoder=encoder, **change)
    assert encoder.embedded == len(first)


def test_an_index_split_under_other_rules_is_re_embedded(corpus, tmp_path, monkeypatch):
    from qkv.retrieval import passages

    out = tmp_path / "index"
    first = build_index([corpus], out, encoder=FakeEncoder())
    assert first.settings["splitter"] == passages.SPLITTER
    monkeypatch.setattr(passages, "SPLITTER", passages.SPLITTER + 1)
    encoder = FakeEncoder()
    build_index([corpus], out, encoder=encoder)
    assert encoder.embedded == len(first)
    assert load_index(out).settings["splitter"] == passages.SPLITTER


@pytest.mark.parametrize("step", range(6))
def test_a_crash_at_any_step_of_an_update_leaves_the_old_index_whole(step, corpus, tmp_path,
                                                                      monkeypatch, crash_at_call):
    out = tmp_path / "index"
    old = build_index([corpus], out, encoder=FakeEncoder())
    (corpus / "cats.md").write_text("# Dogs\n\nDogs bark at the postman.\n")
    calls = crash_at_call(index_module, ("_write_bytes", "atomic_write_text", "_remove"), step)
    with contextlib.suppress(OSError):
        build_index([corpus], out, encoder=FakeEncoder())
    # steps: vectors, passages, manifest (the commit point), then the two old data files
    assert calls[:step + 1] == ["_write_bytes", "_write_bytes", "atomic_write_text", "_remove",
                                "_remove", "_remove"][:len(calls[:step + 1])]
    monkeypatch.undo()
    loaded = load_index(out)
    committed = step >= 3
    assert any("Dogs" in p.text for p in loaded.passages) == committed
    if not committed:
        assert_same(loaded, old)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    encoder = FakeEncoder()
    done = build_index([corpus], out, encoder=encoder)  # a later run completes
    assert encoder.embedded == (0 if committed else 1)
    assert_same(load_index(out), done)
    assert len(list(out.iterdir())) == 3


def test_load_errors_name_the_folder_and_what_is_wrong(corpus, tmp_path):
    out = tmp_path / "index"
    with pytest.raises(IndexFormatError, match=r"no index at .*index: no such folder; build"):
        load_index(out)
    out.mkdir()
    with pytest.raises(IndexFormatError, match=r"not an index: it has no manifest.json"):
        load_index(out)
    build_index([corpus], out, encoder=FakeEncoder())
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    vectors = out / manifest["data"]["vectors"]["path"]
    passages = out / manifest["data"]["passages"]["path"]

    data = vectors.read_bytes()
    vectors.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(IndexFormatError, match=r"corrupt index: checksum mismatch: vectors-"):
        load_index(out)
    vectors.write_bytes(data)
    load_index(out)

    text = passages.read_text()
    passages.unlink()
    with pytest.raises(IndexFormatError, match=r"data file passages-\w+\.json is missing"):
        load_index(out)
    passages.write_text(text)

    def edited(**changes):
        manifest_path.write_text(json.dumps({**manifest, **changes}))
        return out

    renamed = save({"embeddings": torch.zeros(manifest["count"], 16)})
    (out / "other.safetensors").write_bytes(renamed)
    entry = {"path": "other.safetensors", "sha256": hashlib.sha256(renamed).hexdigest(),
             "bytes": len(renamed)}
    with pytest.raises(IndexFormatError, match=r"the vectors file holds no tensor 'vectors'"):
        load_index(edited(data={**manifest["data"], "vectors": entry}))

    with pytest.raises(IndexFormatError, match=r"shape mismatch"):
        load_index(edited(count=manifest["count"] + 1))
    with pytest.raises(IndexFormatError, match=r"shape mismatch"):
        load_index(edited(model={**manifest["model"], "dim": 8}))
    with pytest.raises(IndexFormatError, match=r"not a qkv index"):
        load_index(edited(format="other"))
    with pytest.raises(IndexFormatError, match=r"version 9; this qkv reads version 1"):
        load_index(edited(version=9))
    manifest_path.write_text(json.dumps({k: v for k, v in manifest.items() if k != "files"}))
    with pytest.raises(IndexFormatError, match=r"corrupt index: KeyError: 'files'"):
        load_index(out)
    manifest_path.write_text('{"format": "qkv-index", ')
    with pytest.raises(IndexFormatError, match=r"manifest.json is not valid JSON"):
        load_index(out)
    with pytest.raises(IndexFormatError, match=r"it is a file"):
        load_index(manifest_path)


def test_a_model_that_does_not_match_is_refused(corpus, tmp_path):
    out = tmp_path / "index"
    build_index([corpus], out, encoder=FakeEncoder())
    load_index(out, encoder=FakeEncoder())
    for other in (FakeEncoder(sha256="0" * 64), FakeEncoder(dim=8), FakeEncoder(max_length=128)):
        with pytest.raises(IndexFormatError, match=r"was built with fake .* but the encoder is"):
            load_index(out, encoder=other)


def test_empty_and_binary_files_are_skipped_with_a_warning(corpus, tmp_path):
    (corpus / "empty.txt").write_bytes(b"")
    (corpus / "blank.md").write_bytes(b"  \n\n")
    (corpus / "binary.txt").write_bytes(b"abc\x00def")
    (corpus / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.warns(UserWarning) as caught:
        index = build_index([corpus], encoder=FakeEncoder())
    messages = " | ".join(str(w.message) for w in caught)
    for name, why in (("empty.txt", "it is empty"), ("blank.md", "it holds only whitespace"),
                      ("binary.txt", "it is binary"),
                      ("latin1.txt", "it is not UTF-8 text (byte 0xe9")):
        assert f"skipped {corpus.as_posix()}/{name}: {why}" in messages
    assert len(index.files) == 3 and len(index.report.skipped) == 4
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "empty.txt").write_bytes(b"")
    with pytest.warns(UserWarning, match="empty"), \
            pytest.raises(ValueError, match=r"nothing to index .* left after skipping"):
        build_index([only_bad], encoder=FakeEncoder())


def test_a_corrupt_index_at_out_is_rebuilt_with_a_warning(corpus, tmp_path):
    out = tmp_path / "index"
    build_index([corpus], out, encoder=FakeEncoder())
    (out / "manifest.json").write_text("{")
    encoder = FakeEncoder()
    with pytest.warns(UserWarning, match=r"cannot be reused, so every file is embedded again"):
        index = build_index([corpus], out, encoder=encoder)
    assert encoder.embedded == len(index)
    assert_same(load_index(out), index)


def test_bad_arguments_are_refused(corpus, tmp_path):
    encoder = FakeEncoder()
    index = build_index([corpus], encoder=encoder)
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"k must be an int >= 1"):
            index.rank(["x"], k=k)
    with pytest.raises(ValueError, match=r"queries must be a sequence of str, got one str"):
        index.rank("cats", k=1)
    with pytest.raises(ValueError, match=r"queries\[1\] must be a str"):
        index.rank(["cats", 3], k=1)
    scores, ids = index.rank(["cats", "tea"], k=1000)
    assert ids.shape == (2, len(index)) and sorted(ids[0].tolist()) == list(range(len(index)))
    with pytest.raises(ValueError, match=r"paths: .*missing does not exist"):
        build_index([corpus / "missing"], encoder=encoder)
    with pytest.raises(ValueError, match=r"max_tokens must be at most 254"):
        build_index([corpus], encoder=encoder, max_tokens=300)
    with pytest.raises(ValueError, match=r"overlap must be less than max_tokens"):
        build_index([corpus], encoder=encoder, max_tokens=32, overlap=32)
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1"):
        index_texts({"a.txt": "text"}, encoder=encoder, batch_size=0)
    with pytest.raises(ValueError, match=r"texts must be a mapping"):
        index_texts(["a"], encoder=encoder)
    with pytest.raises(ValueError, match=r"out: .* is a file"):
        build_index([corpus], corpus / "cats.md", encoder=encoder)
    before = sorted(os.listdir(corpus))
    with pytest.raises(ValueError, match=r"holds no index but other files"):
        build_index([corpus], corpus, encoder=encoder)
    assert sorted(os.listdir(corpus)) == before  # nothing written into it


def test_progress_follows_the_passages_embedded(corpus):
    seen = []
    index = build_index([corpus], encoder=FakeEncoder(), progress=lambda *a: seen.append(a))
    assert seen[0] == (0, len(index)) and seen[-1] == (len(index), len(index))


def test_an_index_of_blank_texts_has_no_passages_and_finds_nothing():
    index = index_texts({"a.txt": "", "b.md": "  \n"}, encoder=FakeEncoder())
    assert len(index) == 0 and [row["count"] for row in index.files] == [0, 0]
    scores, ids = index.rank(["anything"], k=3)
    assert scores.shape == ids.shape == (1, 0)
    assert index.search("anything") == []
