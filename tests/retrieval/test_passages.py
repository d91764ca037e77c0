"""Passage splitting: exact spans that cover the document, line numbers, budget, overlap and
structure for python, markdown and text."""

import re
import sysconfig
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.retrieval.passages import KINDS, Passage, kind_of, split_text, wordpiece_counts


def words(texts):
    """A quick stand-in for WordPiece: one token per whitespace-separated word."""
    return [len(t.split()) for t in texts]


def split(text, kind, **kw):
    return split_text(text, kind, file="doc", count_tokens=words, **kw)


def line_of(text, pos):
    return len(re.findall(r"\r\n|\r|\n", text[:pos])) + 1


def check(text, passages, max_tokens=200, count=words):
    """Spans are exact, in order, with right line numbers; they cover every non-space char;
    each passage fits the budget wherever its title leaves room."""
    covered = bytearray(len(text))
    starts = [p.start for p in passages]
    assert starts == sorted(starts)
    for p in passages:
        assert p.text == text[p.start:p.end] and p.text.strip()
        assert p.start_line == line_of(text, p.start)
        assert p.end_line == line_of(text, p.end - 1)
        covered[p.start:p.end] = b"\1" * (p.end - p.start)
        if count([p.title])[0] <= max_tokens // 2:
            assert count([p.embed_text])[0] <= max_tokens, p
    missed = [i for i, c in enumerate(text) if not c.isspace() and not covered[i]]
    assert not missed, (missed[:5], text[missed[0]:missed[0] + 20])


# generated documents: lines of words, headings, fences, code, blank lines; any line ends
WORD = st.sampled_from(["alpha", "beta", "x", "#", "##", "```", "~~~", "===", "---", "-", "def",
                        "class", "f():", "(", ")", ":", "a.b", "é", "\t", "  "])
SHAPED = st.sampled_from(["", "", "   ", "# Head", "## Sub head", "```", "Title", "=====", "---",
                          "def g():", "    return 1", "@dec", "class K:", "    # note"])
LINE = (st.lists(WORD, max_size=12).map(" ".join) | st.lists(WORD, max_size=90).map(" ".join)
        | SHAPED | st.text(max_size=30))
ENDS = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def documents(draw):
    lines = draw(st.lists(LINE, max_size=60))
    end = draw(ENDS)
    return end.join(lines) + draw(st.sampled_from(["", end]))


@st.composite
def python_sources(draw):
    """Valid python: top-level functions and classes (decorated, commented) and module code."""
    out = []
    for i in range(draw(st.integers(0, 8))):
        choice = draw(st.sampled_from(["def", "class", "code", "comment"]))
        body = [f"    v{j} = {j} + x  # {'w ' * draw(st.integers(0, 9))}"
                for j in range(draw(st.integers(1, 40)))]
        if choice == "def":
            out += ["@decorate"] * draw(st.integers(0, 2)) + [f"def f{i}(x):"] + body
        elif choice == "class":
            out += [f"class C{i}:"] + [f"    def m{j}(self, x):\n    " + "\n    ".join(body[:j + 1])
                                       for j in range(draw(st.integers(1, 4)))]
        elif choice == "code":
            out += [f"y{i} = {i}"] * draw(st.integers(1, 30))
        else:
            out += ["# a comment"]
        out += [""] * draw(st.integers(0, 2))
    return draw(ENDS).join("\n".join(out).split("\n"))


@settings(max_examples=150, deadline=None)
@given(documents(), st.sampled_from(["python", "markdown", "text"]), st.integers(16, 60),
       st.integers(0, 15))
def test_spans_are_exact_and_cover_any_text(text, kind, max_tokens, overlap):
    check(text, split(text, kind, max_tokens=max_tokens, overlap=overlap), max_tokens)


@settings(max_examples=60, deadline=None)
@given(python_sources(), st.integers(16, 80), st.integers(0, 15))
def test_spans_are_exact_and_cover_python(source, max_tokens, overlap):
    passages = split(source, "python", max_tokens=max_tokens, overlap=overlap)
    check(source, passages, max_tokens)
    blocks = re.findall(r"(?:^|[\r\n])(def|class) (\w+)", source)  # top-level ones
    assert {f"{word} {name}" for word, name in blocks} <= {p.title for p in passages}


def test_line_numbers():
    text = "one\n\ntwo three\nfour\n\n\nfive\n"
    passages = split(text, "text", max_tokens=16, overlap=0)
    assert [(p.start_line, p.end_line, p.text) for p in passages] == [(1, 7, text.strip())]
    passages = split(text + "six " * 30, "text", max_tokens=16, overlap=0)
    assert [(p.start_line, p.end_line) for p in passages] == [(1, 7), (8, 8), (8, 8)]


def test_empty_and_whitespace_give_no_passages():
    for text in ("", " ", "\n\n", " \t\r\n  \n"):
        for kind in ("python", "markdown", "text"):
            assert split(text, kind) == []


@pytest.mark.parametrize("kwargs, name", [
    ({"kind": "pdf"}, "kind"), ({"max_tokens": 15}, "max_tokens"), ({"overlap": -1}, "overlap"),
    ({"max_tokens": 16, "overlap": 16}, "overlap"), ({"max_tokens": 20.0}, "max_tokens"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    args = {"kind": "text", **kwargs}
    with pytest.raises(ValueError, match=f"^{name} must"):
        split_text("some text", args.pop("kind"), count_tokens=words, **args)


def test_kind_of_and_kinds():
    assert kind_of("a/b.py") == kind_of(Path("x.PYI")) == "python"
    assert kind_of("README.md") == kind_of("notes.markdown") == "markdown"
    assert kind_of("a.txt") == kind_of("a.rst") == kind_of("Makefile") == kind_of("a.c") == "text"
    assert set(KINDS.values()) == {"python", "markdown", "text"}


def test_passage_round_trip():
    passage = split("# A\n\nbody text", "markdown")[0]
    assert Passage.from_dict(passage.to_dict()) == passage
    broken = passage.to_dict()
    del broken["end"]
    with pytest.raises(ValueError, match="'end'"):
        Passage.from_dict(broken)


CODE = '''\
import os

X = 1


# comment about f
# second line
@decorator
@other(arg=1)
def f(a):
    return a


class Box:
    """A box."""

    size = 3

    def put(self, item):
        {body}

    @property
    def empty(self):
        {body}


def g():
        {body}
'''


def long_code():
    return CODE.format(body="\n        ".join(f"x{i} = step({i}, item)" for i in range(40)))


def test_python_blocks_keep_decorators_and_comments_and_are_titled():
    passages = split(long_code(), "python", max_tokens=60, overlap=8)
    check(long_code(), passages, 60)
    f = next(p for p in passages if p.title == "def f")
    assert f.text.startswith("# comment about f\n# second line\n@decorator") and f.start_line == 6
    assert f.embed_text == f.text  # it opens with its own statement
    assert passages[0].title == "" and passages[0].text == "import os\n\nX = 1"
    titles = [p.title for p in passages]
    assert titles.index("class Box") < titles.index("Box.put") < titles.index("Box.empty")
    assert titles[-1] == "def g"
    empty = next(p for p in passages if p.title == "Box.empty")
    assert empty.text.lstrip().startswith("@property")  # cut before the decorator, not after
    assert empty.embed_text.startswith("Box.empty\n")
    assert next(p for p in passages if p.title == "def g").embed_text.startswith("def g():")


def test_overlap_inside_a_block_not_across_blocks():
    code = long_code()
    passages = split(code, "python", max_tokens=60, overlap=8)

    def block(p):
        return p.title.removeprefix("class ").removeprefix("def ").split(".")[0]

    pairs = list(zip(passages, passages[1:], strict=False))
    assert all(a.end < b.start for a, b in pairs if block(a) != block(b))
    g = [(a, b) for a, b in pairs if block(a) == block(b) == "g"]
    assert len(g) >= 3
    for a, b in g:  # whole trailing lines worth at most `overlap` tokens
        assert b.start < a.end and code[b.start - 1] == "\n" and code[a.end] == "\n"
        assert 0 < words([code[b.start:a.end]])[0] <= 8
    put = [p for p in passages if p.title == "Box.put"]
    empty = next(p for p in passages if p.title == "Box.empty")
    assert put[-1].end < empty.start  # a cut at a method's start does not overlap


def test_titles_inside_nested_classes_and_async_defs():
    body = "\n".join(f"            v{i} = {i}" for i in range(30))
    code = (f"class Outer:\n    class Inner:\n        x = 1\n\n        def method(self):\n{body}\n"
            f"\n\nasync def run():\n    await go()\n")
    passages = split(code, "python", max_tokens=32, overlap=0)
    check(code, passages, 32)
    titles = [p.title for p in passages]
    assert titles[0] == "class Outer" and "Outer.Inner.method" in titles
    assert titles[-1] == "def run" and passages[-1].embed_text == "async def run():\n    await go()"
    method = [p for p in passages if p.title == "Outer.Inner.method"]
    assert all(p.embed_text == "Outer.Inner.method\n" + p.text for p in method)


def test_no_overlap_when_overlap_is_zero():
    passages = split(long_code(), "python", max_tokens=60, overlap=0)
    assert all(a.end < b.start for a, b in zip(passages, passages[1:], strict=False))


def test_syntax_error_falls_back_to_text_rules():
    text = "def broken(:\n    pass\n\nsecond paragraph here\n\n" + "word " * 20
    passages = split(text, "python", max_tokens=16, overlap=0)
    check(text, passages, 16)
    assert all(p.title == "" and p.kind == "python" for p in passages)
    assert passages[0].text == "def broken(:\n    pass\n\nsecond paragraph here"


def test_python_parse_warnings_stay_quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (passage,) = split('def f():\n    return "\\d+"\n', "python")
    assert passage.title == "def f"  # parsed, although a warning turned error would not let it


def test_markdown_fenced_code_makes_no_headings():
    text = ("# Guide\n\nIntro.\n\n```python\n# not a heading\nx = 1\n```\n\n~~~\n## nor this\n"
            "~~~\n\n## Install\n\nRun it.\n\n````\n```\n# still code\n````\n# Next\ntext\n")
    passages = split(text, "markdown")
    check(text, passages)
    assert [p.title for p in passages] == ["Guide", "Guide > Install", "Next"]
    assert "# not a heading" in passages[0].text and "# still code" in passages[1].text


def test_markdown_front_matter_and_indented_code_make_no_headings():
    text = "---\ntitle: Notes\n---\n\nIntro\n\n    # indented code\n\n# Real\n\nbody\n"
    passages = split(text, "markdown")
    check(text, passages)
    assert [(p.title, p.start_line) for p in passages] == [("", 1), ("Real", 9)]


def test_markdown_setext_headings_and_paths():
    text = ("preamble\n\nTop\n===\n\nbody\n\nSection two\nspans lines\n---\n\nmore\n\n"
            "### Deep #\n\ndeep text\n\nNot a heading\n\n---\n")
    passages = split(text, "markdown")
    check(text, passages)
    assert [(p.title, p.start_line) for p in passages] == [
        ("", 1), ("Top", 3), ("Top > Section two spans lines", 8),
        ("Top > Section two spans lines > Deep", 14)]
    deep = passages[-1]
    assert deep.embed_text == "Top > Section two spans lines\n" + deep.text
    assert passages[1].embed_text == passages[1].text


def test_markdown_windows_inside_a_section_carry_the_heading_path():
    text = "# A\n\n## B\n\n" + "\n\n".join(f"para {i} " + "w " * 10 for i in range(12))
    passages = split(text, "markdown", max_tokens=40, overlap=0)
    check(text, passages, 40)
    later = [p for p in passages if p.title == "A > B"][1:]
    assert later and all(p.embed_text.startswith("A > B\npara ") for p in later)
    assert all(p.text.startswith("para") for p in later)  # cut at paragraph starts


def test_crlf_spans_stay_exact():
    text = long_code().replace("\n", "\r\n")
    passages = split(text, "python", max_tokens=60, overlap=8)
    check(text, passages, 60)
    assert [p.title for p in passages] == \
        [p.title for p in split(long_code(), "python", max_tokens=60, overlap=8)]
    md = "Title\r\n=====\r\n\r\nbody\r\n\r\n# Two\r\nx\r\n"
    assert [(p.title, p.start_line, p.end_line) for p in split(md, "markdown")] == \
        [("Title", 1, 4), ("Two", 6, 7)]


def test_long_line_is_cut_at_whitespace():
    line = " ".join(f"w{i}" for i in range(100))
    text = f"short\n{line}\nafter"
    passages = split(text, "text", max_tokens=16, overlap=4)
    check(text, passages, 16)
    middle = [p for p in passages if p.start_line == p.end_line == 2]
    assert len(middle) >= 7 and all(words([p.text])[0] <= 16 for p in middle)
    assert all(text[p.start - 1] in " \n" and text[p.end] in " \n" for p in middle)


def test_long_word_is_cut_at_punctuation():
    text = "x" + ",y" * 40
    pieces = re.compile(r"\w+|[^\w\s]")
    passages = split_text(text, "text", max_tokens=16, overlap=0,
                          count_tokens=lambda ts: [len(pieces.findall(t)) for t in ts])
    assert len(passages) >= 5 and "".join(p.text for p in passages) == text


REAL_LINES = [
    "def split_text(text: str, kind: str, *, file: str = \"\", max_tokens: int = 200,",
    "    \"\"\"Passages of `text` (a document of `kind`) — naïve café résumé 東京.\"\"\"",
    "        return {k: v for k, v in zip(keys, values, strict=True)}  # zip!",
    "## Install > From source",
]


def test_wordpiece_counts_add_over_lines():
    counts = wordpiece_counts(REAL_LINES)
    assert all(c > 3 for c in counts)
    for sep in ("\n", "\r\n", " "):
        assert wordpiece_counts([sep.join(REAL_LINES)]) == [sum(counts)]
    lines = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text().splitlines()
    assert wordpiece_counts(["\n".join(lines)]) == [sum(wordpiece_counts(lines))]


def test_budget_with_the_real_tokenizer():
    path = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    text = path.read_text(encoding="utf-8")
    passages = split_text(text, "python", file=str(path), max_tokens=64, overlap=16)
    check(text, passages, 64, count=wordpiece_counts)
    lengths = wordpiece_counts([p.embed_text for p in passages])
    assert max(lengths) <= 64 and sum(lengths) / len(lengths) > 32
