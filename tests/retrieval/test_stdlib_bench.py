"""The standard-library retrieval benchmark: its builder (over a small fake library), metrics,
BM25 and random baselines, and the cost side."""

import ast
import io
import re
import sysconfig
import tokenize
from pathlib import Path

import pytest

from qkv.retrieval.passages import Passage
from qkv.retrieval.stdlib import (
    Benchmark,
    Target,
    bm25_rankings,
    build_benchmark,
    code_tokens,
    first_sentence,
    metrics,
    random_rankings,
    reader_plans,
    relevant,
    relevant_sets,
    retrieval_cost,
    stdlib_modules,
    strip_docs,
)

MODULE = '''#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""Module docstring that explains everything here.

More about the module.
"""

import os  # an inline comment about os

CONSTANT = 3
"""Attribute docstring describing the constant value."""

s = "é ü"; """Docstring after a non-ASCII string on one line."""


@staticmethod
def decorated_function(a, b):
    """Compute the decorated answer from both arguments. Then more."""
    # a full-line comment inside the body
    return a + b  # trailing comment


def body_is_doc():
    """Function whose body holds nothing but this docstring."""


def one_liner(): "Return a value from a one line body."


class Widget(object):
    """A widget that frobs things for the caller.

    Longer description of the widget.
    """

    size = 1
    """Size docstring for the attribute of the widget."""

    def frob(self, x):
        """Frob the value x, e.g. twice, and return it."""

        def inner():
            """Inner helper that is nested inside frob itself."""
            return x
        return inner()

    async def wait_for_it(self):
        """Wait for the thing to happen eventually."""; return None

    class Nested:
        """Nested class with only this docstring inside."""

    def short(self):
        """Too short."""
        return 1

    def doctested(self):
        """>>> Widget().doctested()
        1
        """
        return 1
'''

SENTENCES = ["Module docstring that explains everything here.",
             "Attribute docstring describing the constant value.",
             "Docstring after a non-ASCII string on one line.",
             "Compute the decorated answer from both arguments.",
             "Function whose body holds nothing but this docstring.",
             "Return a value from a one line body.", "A widget that frobs things for the caller.",
             "Size docstring for the attribute of the widget.",
             "Frob the value x, e.g. twice, and return it.",
             "Inner helper that is nested inside frob itself.",
             "Wait for the thing to happen eventually.",
             "Nested class with only this docstring inside.", "Too short.", "More about"]
EXPECTED = {"decorated_function": "function", "body_is_doc": "function",
            "one_liner": "function", "Widget": "class", "Widget.frob": "function",
            "Widget.frob.inner": "function", "Widget.wait_for_it": "function",
            "Widget.Nested": "class"}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A fake standard library: two big modules, and files the rule leaves out."""
    files = {"big.py": MODULE, "pkg/sub.py": MODULE.replace("Widget", "Gadget"),
             "small.py": "x = 1\n", "test/test_big.py": MODULE, "pkg/tests/helper.py": MODULE,
             "idlelib/idle_test/t.py": MODULE, "_sysconfigdata__linux.py": MODULE,
             "pydoc_data/topics.py": MODULE, "site-packages/third.py": MODULE,
             "notes.txt": MODULE}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


def test_stdlib_modules_keeps_big_modules_and_leaves_out_tests_and_generated(root):
    found = [p.relative_to(root).as_posix() for p in stdlib_modules(20, root)]
    assert found == ["big.py", "pkg/sub.py"]
    assert [p.name for p in stdlib_modules(1, root)] == ["big.py", "sub.py", "small.py"]
    with pytest.raises(ValueError, match="min_lines"):
        stdlib_modules(0, root)
    with pytest.raises(ValueError, match="root"):
        stdlib_modules(10, root / "missing")


def _comments(text: str) -> list[str]:
    return [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline)
            if t.type == tokenize.COMMENT]


def test_documents_hold_no_docstring_and_no_comment_and_parse(root):
    bench = build_benchmark(20, root)
    assert sorted(bench.documents) == ["big.py", "pkg/sub.py"]
    for doc in bench.documents.values():
        ast.parse(doc)
        assert _comments(doc) == []
        assert "docstring" not in doc.lower() and "widget that" not in doc.lower()
        for sentence in SENTENCES:
            assert sentence not in doc
        assert doc.count("\n") == MODULE.count("\n")  # every line stays where it was
        assert not re.search(r"[ \t]+$", doc, re.M)  # no blanks left behind
        assert 'CONSTANT = 3\n' in doc and 's = "é ü";\n' in doc and "return a + b\n" in doc
    doc = bench.documents["big.py"]
    assert "def body_is_doc():\n    pass\n" in doc
    assert "def one_liner(): pass\n" in doc
    assert "async def wait_for_it(self):\n        pass; return None\n" in doc
    assert "class Nested:\n        pass\n" in doc


def test_targets_point_at_their_def_or_class_line(root):
    bench = build_benchmark(20, root)
    got = {t.name: t.kind for t in bench.targets if t.document == "big.py"}
    assert got == EXPECTED
    assert bench.skipped == {"short_query": 4, "unreadable": []}  # short, doctest; twice
    for t in bench.targets:
        line = bench.documents[t.document].split("\n")[t.line - 1]
        word = "class" if t.kind == "class" else "def"
        assert re.match(rf"\s*(async )?{word} {t.name.split('.')[-1]}\b", line), (t, line)
        assert t.end_line >= t.line
    queries = {t.name: t.query for t in bench.targets if t.document == "big.py"}
    assert queries["Widget.frob"] == "Frob the value x, e.g. twice, and return it."
    assert queries["decorated_function"] == "Compute the decorated answer from both arguments."
    assert bench.modules == [{"name": "big.py", "lines": MODULE.count("\n"),
                              "tokens": bench.modules[0]["tokens"]},
                             {"name": "pkg/sub.py", "lines": MODULE.count("\n"),
                              "tokens": bench.modules[1]["tokens"]}]
    assert bench.modules[0]["tokens"] > MODULE.count("\n")


def test_strip_docs_keeps_a_body_valid_and_a_syntax_error_raises():
    src = ('if x:\n    "only"\nelse:\n    "one"; "two"\ntry:\n    pass\nfinally:\n'
           '    """a\n    b"""\n')
    out = strip_docs(src)
    ast.parse(out)
    assert out == "if x:\n    pass\nelse:\n    pass;\ntry:\n    pass\nfinally:\n    pass\n\n"
    with pytest.raises(SyntaxError):
        strip_docs("def (:\n")


@pytest.mark.parametrize("doc, sentence", [
    ("Return the thing.", "Return the thing."),
    ("Return the thing. More words here.", "Return the thing."),
    ("Return the\n    thing across lines.  Second.", "Return the thing across lines."),
    ("No period at all\n\nSecond paragraph.", "No period at all"),
    ("Use os.path.join to build 3.14 paths.", "Use os.path.join to build 3.14 paths."),
    ("Frob it, e.g. twice, i.e. again (etc.) and stop. Then more.",
     "Frob it, e.g. twice, i.e. again (etc.) and stop."),
    ("\n\n   Leading blank lines are skipped.\n", "Leading blank lines are skipped."),
    ("reduce(function, iterable[, initial]) -> value\n\nApply a function. More.",
     "Apply a function."),
    ("D.get(k[,d]) -> D[k] if k in D, else d.\n\nMore.", "D.get(k[,d]) -> D[k] if k in D, else d."),
    ("only_signature(a, b)", "only_signature(a, b)"),
    (">>> f()\n1\n", ""),
    ("", ""),
    ("Ends with ellipsis... and goes on", "Ends with ellipsis..."),
])
def test_first_sentence(doc, sentence):
    assert first_sentence(doc) == sentence


def test_metrics_on_hand_computed_rankings():
    rankings = [[3, 1, 2], [0, 5, 6, 7, 8, 9], [9, 8, 7], [2, 4]]
    rel = [{3}, {7, 9}, {0}, {4, 2}]
    m = metrics(rankings, rel, ks=(1, 2, 5))
    # first relevant ranks: 1, 4, none, 1
    assert m == {"queries": 4, "recall@1": 0.5, "recall@2": 0.5, "recall@5": 0.75,
                 "mrr": (1 + 1 / 4 + 0 + 1) / 4, "mrr_cutoff": 100}
    assert metrics(rankings, rel, cutoff=3)["mrr"] == 0.5  # rank 4 is past the cutoff
    with pytest.raises(ValueError, match=r"relevant_sets\[1\] is empty"):
        metrics([[0], [1]], [{0}, set()])
    with pytest.raises(ValueError, match="same length"):
        metrics([[0]], [{0}, {1}])
    with pytest.raises(ValueError, match="at least one"):
        metrics([], [])


def _passage(file: str, a: int, b: int, text: str = "x") -> Passage:
    return Passage(file, 0, len(text), a, b, "python", "", text)


def test_relevant_picks_the_passages_of_the_document_holding_the_line():
    passages = [_passage("a.py", 1, 10), _passage("a.py", 8, 20), _passage("b.py", 1, 30),
                _passage("a.py", 21, 30)]
    t = Target("q", "a.py", "f", "function", 9, 12)
    assert relevant(passages, t) == {0, 1}
    assert relevant(passages, Target("q", "a.py", "g", "function", 21, 25)) == {3}
    assert relevant(passages, Target("q", "c.py", "g", "function", 5, 6)) == set()
    targets = [t, Target("q", "b.py", "h", "class", 30, 31), Target("q", "a.py", "k", "class",
                                                                    31, 32)]
    assert relevant_sets(passages, targets) == [{0, 1}, {2}, set()]


def test_code_tokens_split_identifiers_and_keep_them_whole():
    assert code_tokens("def run_until_complete(HTTPServer, x2):") == [
        "def", "run_until_complete", "run", "until", "complete", "httpserver", "http", "server",
        "x2", "x", "2"]
    assert code_tokens("parseURLString is the thing") == ["parseurlstring", "parse", "url",
                                                          "string", "thing"]


def test_bm25_ranks_the_obvious_match_first():
    corpus = ["def open_file(path):\n    return open(path)",
              "class HttpServer:\n    def serve_forever(self): pass",
              "def compute_checksum(data):\n    return sha256(data)"]
    ranked = bm25_rankings(corpus, ["Serve requests forever on the HTTP server.",
                                    "Compute the checksum of the data."], k=5)
    assert [r[0] for r in ranked] == [1, 2]
    assert all(sorted(r) == [0, 1, 2] for r in ranked)  # k is cut to the corpus size
    with pytest.raises(ValueError, match="passages"):
        bm25_rankings([], ["q"], 3)


def test_random_baseline_is_seeded():
    a = random_rankings(50, 4, 10, seed=3)
    assert a == random_rankings(50, 4, 10, seed=3)
    assert a != random_rankings(50, 4, 10, seed=4)
    assert all(len(set(r)) == 10 and all(0 <= i < 50 for i in r) for r in a)
    assert [sorted(r) for r in random_rankings(3, 2, 10)] == [[0, 1, 2], [0, 1, 2]]


def test_retrieval_cost_sums_the_top_k_passages_of_each_query():
    bench = Benchmark({"a.py": "", "b.py": ""},
                      [Target("q", "a.py", "f", "function", 1, 1),
                       Target("q", "a.py", "g", "function", 2, 2)],
                      [{"name": "a.py", "lines": 10, "tokens": 100},
                       {"name": "b.py", "lines": 5, "tokens": 50}], "3.x")
    passages = [_passage("a.py", 1, 1, "one"), _passage("a.py", 2, 2, "two three"),
                _passage("b.py", 1, 1, "four five six")]
    rows = retrieval_cost(bench, passages, [[0, 1, 2], [2, 0]], k=2,
                          counter=lambda texts: [len(t.split()) for t in texts])
    assert rows == [{"name": "a.py", "lines": 10, "tokens": 100, "queries": 2,
                     "retrieved_tokens": (3 + 4) / 2, "ratio": 100 / 3.5},
                    {"name": "b.py", "lines": 5, "tokens": 50, "queries": 0,
                     "retrieved_tokens": None, "ratio": None}]


def test_reader_plans_cost_more_for_the_whole_module():
    plans = reader_plans({"whole": 20_000, "retrieved": 800}, model="gpt2")  # quick to count
    whole, retrieved = plans["whole"]["backends"], plans["retrieved"]["backends"]
    assert set(whole) == {"sdpa", "chunked", "reference"}
    assert plans["whole"]["time_source"] == "uncalibrated"
    for b in whole:
        assert whole[b]["peak_bytes"] > retrieved[b]["peak_bytes"]
        assert whole[b]["seconds"] > retrieved[b]["seconds"]
    assert whole["reference"]["attention_bytes"] > 20_000 ** 2  # quadratic scores


def test_one_real_module():
    base = Path(sysconfig.get_paths()["stdlib"])
    bench = build_benchmark(root=base, modules=[base / "functools.py"])
    doc = bench.documents["functools.py"]
    ast.parse(doc)
    assert _comments(doc) == []
    assert len(bench.targets) > 20
    for t in bench.targets:
        assert t.query not in doc
        line = doc.split("\n")[t.line - 1]
        assert re.match(rf"\s*(async )?(def|class) {t.name.split('.')[-1]}\b", line), t
