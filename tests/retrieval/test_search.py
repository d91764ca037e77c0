"""Retrieval with the shipped all-MiniLM-L6-v2 on a tiny hand-made corpus whose answers are known;
exact cosine against float64; best sentences; query truncation."""

import os
import warnings

import pytest
import torch

from qkv.retrieval import QueryTruncatedWarning, build_index, index_texts, load_index, sentences
from qkv.retrieval.index import IndexFormatError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = {
    "bees.md": "# Honey bees\n\nA colony of honey bees has one queen and thousands of workers. "
               "Workers collect nectar from flowers and turn it into honey.\n\n"
               "Bees dance to tell each other where the flowers are.\n",
    "volcano.txt": "Volcanoes form where magma rises through the crust. When pressure builds "
                   "up, the volcano erupts and lava flows down its sides.\n\nAsh clouds from "
                   "an eruption can ground aircraft for days.\n",
    "bread.md": "# Baking bread\n\nMix flour, water, salt and yeast into a dough. Knead it for "
                "ten minutes, let it rise for an hour, then bake it at 230 degrees.\n",
    "chess.txt": "In chess the bishop moves diagonally and the rook moves in straight lines. "
                 "Castling moves the king two squares towards a rook.\n",
    "retry.py": "import time\n\n\ndef retry(call, attempts=3, delay=1.0):\n"
                "    for attempt in range(attempts):\n        try:\n            return call()\n"
                "        except ConnectionError:\n            time.sleep(delay * 2 ** attempt)\n"
                "    raise TimeoutError('gave up')\n",
}
QUESTIONS = {
    "How do bees make honey?": ("bees.md", "Workers collect nectar"),
    "What happens when a volcano erupts?": ("volcano.txt", "the volcano erupts"),
    "How long should dough rise before baking?": ("bread.md", "let it rise for an hour"),
    "Which chess piece moves diagonally?": ("chess.txt", "the bishop moves diagonally"),
    "retry a network call with exponential backoff": ("retry.py", "def retry"),
}


@pytest.fixture(scope="module")
def encoder():
    import torch as _torch

    from qkv.interop.minilm import _shipped

    return _shipped(_torch.device("cpu"))


@pytest.fixture(scope="module")
def index(encoder):
    return index_texts(CORPUS, encoder=encoder)


def test_the_shipped_model_names_itself(encoder):
    from qkv.interop.minilm import MODEL_SHA256

    assert encoder.identity == {"name": "sentence-transformers/all-MiniLM-L6-v2",
                                "sha256": MODEL_SHA256, "dim": 384, "max_length": 256}
    counts = encoder.count_tokens(["hello world", "", "word " * 300])
    assert counts == [2, 0, 300]  # no [CLS]/[SEP], never cut


def test_each_question_ranks_its_document_first_with_the_answer_sentence(index):
    hits = index.search_many(list(QUESTIONS), k=3)
    for (question, (file, phrase)), row in zip(QUESTIONS.items(), hits, strict=True):
        assert row[0].passage.file == file, (question, [h.passage.file for h in row])
        assert phrase in row[0].sentence_text, (question, row[0].sentence_text)
        assert [h.rank for h in row] == [1, 2, 3]
        assert row[0].score >= row[1].score >= row[2].score
        assert -1 <= row[0].sentence_score <= 1


def test_rank_is_exact_cosine(index):
    queries = list(QUESTIONS)
    scores, ids = index.rank(queries, k=4)
    q = index.embed_queries(queries).double()
    expected = (q @ index.vectors.double().T).topk(4, dim=1)
    torch.testing.assert_close(scores.double(), expected.values, atol=1e-6, rtol=0)
    assert torch.equal(ids, expected.indices)
    norms = index.vectors.double().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)


def test_k_larger_than_the_index_returns_every_passage(index):
    hits = index.search("bees", k=1000)
    assert len(hits) == len(index)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        index.search("bees", k=0)
    with pytest.raises(ValueError, match="query must be a str"):
        index.search(["bees"])


def test_a_query_over_the_model_limit_warns_how_many_tokens_were_kept(index):
    long_query = "how do bees make honey " * 80  # 400 tokens
    with pytest.warns(QueryTruncatedWarning, match=r"402 tokens .* only its first 256 tokens"):
        hits = index.search(long_query, k=1)
    assert hits[0].passage.file == "bees.md"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index.search("how do bees make honey", k=1)  # a short query: no warning


def test_a_hit_serialises_with_exact_file_offsets(index):
    hit = index.search("Castling moves the king", k=1)[0]
    record = hit.to_dict()
    text = CORPUS[record["file"]]
    assert text[record["start"]:record["end"]] == record["text"]
    sentence = record["sentence"]
    assert text[sentence["start"]:sentence["end"]] == sentence["text"] == hit.sentence_text
    assert sentence["text"] == "Castling moves the king two squares towards a rook."
    assert text.count("\n", 0, sentence["start"]) + 1 == sentence["line"]


@pytest.mark.parametrize("text, kind, expected", [
    ("One. Two! Three?\n\nFour, e.g. this one.", "text",
     ["One.", "Two!", "Three?", "Four, e.g. this one."]),
    ("# Title\nSome text.\n- item one\n- item two\n\n```\nx = 1\n\ny = 2\n```\nAfter.\n",
     "markdown", ["# Title", "Some text.", "- item one", "- item two", "x = 1", "y = 2",
                  "After."]),
    ("def f():\n    return 1\n\n    # done\n", "python",
     ["def f():", "return 1", "# done"]),
    ("  \n\n", "text", []),
    ('He said "Stop." Then left.\r\nNew line here.', "text",
     ['He said "Stop."', "Then left.", "New line here."]),
    ("Setext title\n============\nBody text\n\n---\n", "markdown",
     ["Setext title", "Body text"]),
])
def test_sentences_are_exact_spans(text, kind, expected):
    spans = sentences(text, kind)
    assert [text[s:e] for s, e in spans] == expected
    assert all(text[s:e] == text[s:e].strip() for s, e in spans)


def test_a_saved_index_searches_like_the_in_memory_one(index, encoder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, text in CORPUS.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    build_index(sorted(CORPUS), "idx", encoder=encoder)
    loaded = load_index("idx", encoder=encoder)
    question = "Which chess piece moves diagonally?"
    assert loaded.search(question, k=1)[0].passage == index.search(question, k=1)[0].passage


def test_the_default_encoder_is_checked_against_the_index(index, monkeypatch):
    import types

    import qkv.retrieval.index as module

    other = types.SimpleNamespace(identity={**index.model, "sha256": "0" * 64})
    monkeypatch.setattr(module, "default_encoder", lambda: other)
    monkeypatch.setattr(index, "encoder", None)
    with pytest.raises(IndexFormatError, match="built with sentence-transformers/all-MiniLM-L6"):
        index.search("text")


def test_the_sentences_of_all_hits_are_embedded_in_one_call(index, monkeypatch):
    calls = []
    real = index.encoder.encode_ids

    def counted(ids, **kwargs):
        calls.append(len(ids))
        return real(ids, **kwargs)

    monkeypatch.setattr(index.encoder, "encode_ids", counted)
    hits = index.search_many(list(QUESTIONS), k=3)
    sentences_shown = {(h.passage, s) for row in hits for h in row
                       for s in sentences(h.passage.text, h.passage.kind)}
    assert calls == [len(QUESTIONS), len(sentences_shown)]
