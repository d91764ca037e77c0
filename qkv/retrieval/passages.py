"""Split documents into overlapping passages along their structure, for retrieval.

A passage is an exact span of its document: `passage.text == text[passage.start:passage.end]`.
Passages come in order of `start`, and every non-whitespace character of the document lies in at
least one of them.

Structure, by kind:
- python: each top-level `def`/`class` block is a unit (the decorators and the comment lines
  directly above it belong to it); the module-level code between two blocks is a unit. Text that
  does not parse as Python is split by the text rules.
- markdown: each ATX (`#`) or setext heading starts a section (nothing inside a fenced code block
  or a leading `---` front matter is a heading); the lines before the first heading are a section.
- text: the whole document is one unit of paragraphs (blank-line separated).

A unit that fits the token budget is one passage. A larger one is cut into windows at line
boundaries, preferring (python) the start of a nested `def`/`class`, then a line after a blank
line, then any statement start; (markdown, text) a paragraph or fence start. A window is at least
a quarter full before a preferred cut is taken. Consecutive windows of one unit share whole
trailing lines worth at most `overlap` tokens, except after a cut at a nested `def`/`class`;
units never overlap. A single line longer than the budget is cut at whitespace (at punctuation
inside a word, if a word alone is too long) into pieces that do not overlap.

Tokens are MiniLM WordPiece tokens, counted without [CLS] and [SEP]. WordPiece counts add over
whitespace-separated parts, so each line is counted once and a window's count is a sum.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import os
import re
import warnings
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from pathlib import Path

# The splitting rules' version: an index made under other rules re-splits and re-embeds its files
# rather than reusing passages that this version would cut differently.
SPLITTER = 1

KINDS: dict[str, str] = {".py": "python", ".pyi": "python", ".md": "markdown",
                         ".markdown": "markdown", ".txt": "text", ".text": "text", ".rst": "text"}
_KIND_NAMES = ("python", "markdown", "text")
_NEWLINE = re.compile(r"\r\n|\r|\n")  # line ends, as Python's own parser sees them

Counter = Callable[[list[str]], list[int]]


def kind_of(path: str | os.PathLike) -> str:
    """The kind of a file by its suffix (case-insensitive); any other suffix is "text"."""
    return KINDS.get(Path(path).suffix.lower(), "text")


@dataclasses.dataclass(frozen=True)
class Passage:
    """One span of a document: `text == document[start:end]`; lines are 1-based, inclusive.

    `title`: python "def name" / "class Name" for a top-level block, "Name.method" (or
    "class Name.Inner") for a window inside a class, named by the nearest enclosing def; markdown
    the heading path "Install > From source"; "" for none.
    """

    file: str
    start: int
    end: int
    start_line: int
    end_line: int
    kind: str
    title: str
    text: str

    @property
    def embed_text(self) -> str:
        """What gets embedded: the text, with the title on a line before it when the text does
        not open with it (markdown: a passage opening with its own heading gets only the
        headings above it)."""
        prefix = _prefix(self.kind, self.title, self.text)
        return f"{prefix}\n{self.text}" if prefix else self.text

    def to_dict(self) -> dict:
        """A JSON-able dict of the fields; `Passage.from_dict` is its inverse."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Passage:
        """The passage `to_dict` gave; ValueError naming the first missing or mistyped field."""
        values = {}
        for field in dataclasses.fields(cls):
            value = d.get(field.name) if isinstance(d, dict) else None
            kind = int if field.type == "int" else str
            if type(value) is not kind:
                raise ValueError(f"passage field {field.name!r} must be {kind.__name__}, "
                                 f"got {value!r:.60}")
            values[field.name] = value
        return cls(**values)


def _prefix(kind: str, title: str, text: str) -> str:
    """The line put before `text` in `embed_text` ("" for none)."""
    if not title:
        return ""
    if kind == "markdown":
        first = _NEWLINE.split(text.lstrip(), 1)[0]
        *above, name = title.split(" > ")
        return " > ".join(above) if _heading_name(first) == name else title
    if kind == "python" and " " in title:  # "def name" / "class Name" of a top-level block
        word, name = title.split(" ", 1)
        for line in text.splitlines():
            code = line.strip()
            if code and code[0] not in "@#":
                opens = re.match(rf"(async\s+)?{word}\s+{re.escape(name)}\b", code)
                return "" if opens else title
    return title


def _heading_name(line: str) -> str:
    return line.strip().lstrip("#").rstrip("#").strip()


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from tokenizers import Tokenizer

    from qkv.interop.minilm import model_dir

    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def wordpiece_counts(texts: list[str]) -> list[int]:
    """MiniLM WordPiece token counts of `texts`, without [CLS] and [SEP] (shipped tokenizer)."""
    encodings = _tokenizer().encode_batch(list(texts), add_special_tokens=False)
    return [len(e.ids) for e in encodings]


def split_text(text: str, kind: str, *, file: str = "", max_tokens: int = 200,
               overlap: int = 32, count_tokens: Counter | None = None) -> list[Passage]:
    """Passages of `text` (a document of `kind`) of at most `max_tokens` tokens each.

    `count_tokens(embed_text) <= max_tokens` for every passage wherever a single line allows
    (a heading path longer than half the budget may push a passage over); consecutive windows of
    one structural unit share trailing lines worth at most `overlap` tokens. `count_tokens` maps
    a list of strings to their token counts (default: MiniLM WordPiece, see `wordpiece_counts`).
    A python text that does not parse is split by the text rules (its passages keep kind
    "python"). Empty or whitespace-only text gives [].
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    if kind not in _KIND_NAMES:
        raise ValueError(f"kind must be one of {', '.join(_KIND_NAMES)}, got {kind!r}")
    if not isinstance(max_tokens, int) or max_tokens < 16:
        raise ValueError(f"max_tokens must be an int of at least 16, got {max_tokens!r}")
    if not isinstance(overlap, int) or not 0 <= overlap < max_tokens:
        raise ValueError(f"overlap must be an int in [0, max_tokens={max_tokens}), "
                         f"got {overlap!r}")
    if not text.strip():
        return []
    doc = _Document(text, kind, file, max_tokens, overlap, count_tokens or wordpiece_counts)
    units = None
    if kind == "python":
        units = _python_units(doc)
    elif kind == "markdown":
        units = _markdown_units(doc)
    if units is None:
        doc.breaks[3] = doc.after_blank
        units = [(0, doc.n, _fixed(""))]
    for a, b, title_at in units:
        doc.pack(a, b, title_at)
    return doc.passages


class _Document:
    """One document's lines, their token counts and cut points, and the passages cut so far."""

    def __init__(self, text, kind, file, max_tokens, overlap, count_tokens):
        self.text, self.kind, self.file = text, kind, file
        self.max_tokens, self.overlap, self.count_tokens = max_tokens, overlap, count_tokens
        seps = [m.span() for m in _NEWLINE.finditer(text)]
        self.offsets = [0] + [end for _, end in seps]  # offsets[i]: where line i starts
        stops = [start for start, _ in seps] + [len(text)]
        if self.offsets[-1] == len(text):  # a final line ending opens no new line
            self.offsets.pop()
            stops.pop()
        self.n = n = len(self.offsets)
        self.offsets.append(len(text))
        self.lines = [text[self.offsets[i]:stops[i]] for i in range(n)]
        self.blank = [not line.strip() for line in self.lines]
        distinct = list({line.strip() for line in self.lines} - {""})  # each counted once
        known = dict(zip(distinct, self._count(distinct), strict=True))
        self.counts = [known.get(line.strip(), 0) for line in self.lines]
        self.cumulative = [0]  # cumulative[i]: tokens of lines before i
        for c in self.counts:
            self.cumulative.append(self.cumulative[-1] + c)
        self.after_blank = [i for i in range(1, n) if self.blank[i - 1] and not self.blank[i]]
        self.breaks: dict[int, list[int]] = {}  # priority -> sorted line indices to cut before
        self.fresh: set[int] = set()  # cut points after which the next window does not overlap
        self.title_tokens: dict[str, int] = {"": 0}
        self.passages: list[Passage] = []

    def _count(self, texts: list[str]) -> list[int]:
        counts = list(self.count_tokens(texts)) if texts else []
        if len(counts) != len(texts):
            raise ValueError(f"count_tokens must return one count per text: got {len(counts)} "
                             f"for {len(texts)}")
        return counts

    def next_nonblank(self, i: int, stop: int) -> int:
        while i < stop and self.blank[i]:
            i += 1
        return i

    def budget(self, title: str) -> int:
        if title not in self.title_tokens:
            self.title_tokens[title] = self._count([title])[0]
        return max(self.max_tokens - self.title_tokens[title], self.max_tokens // 2)

    def pack(self, a: int, b: int, title_at: Callable[[int], str]) -> None:
        """Cut lines [a, b) of one structural unit into windows that fit the budget."""
        cum = self.cumulative
        s, last_end = self.next_nonblank(a, b), a
        while s < b:
            title = title_at(s)
            budget = self.budget(title)
            if self.counts[s] > budget:
                self.cut_line(s, title, budget)
                s = last_end = self.next_nonblank(s + 1, b)
                continue
            e = min(bisect_right(cum, cum[s] + budget, s, b + 1) - 1, b)
            if e <= last_end < b:  # the overlap left no room for a new line
                s = self.next_nonblank(last_end, b)
                continue
            if e < b and self.counts[e] <= budget:  # (a long line at e is cut on its own)
                fill = bisect_left(cum, cum[s] + budget // 4, s + 1, e + 1)
                e = self.best_break(max(fill, last_end + 1, s + 1), e)
            self.emit(self.offsets[s], self.offsets[e], title)
            if self.next_nonblank(e, b) == b:
                return
            o = e if e in self.fresh else bisect_left(cum, cum[e] - self.overlap, s + 1, e)
            s, last_end = self.next_nonblank(o, e), e

    def best_break(self, lo: int, hi: int) -> int:
        """The preferred line in [lo, hi] to cut before: highest priority, then latest."""
        for priority in sorted(self.breaks, reverse=True):
            lines = self.breaks[priority]
            i = bisect_right(lines, hi) - 1
            if i >= 0 and lines[i] >= lo:
                return lines[i]
        return hi

    def cut_line(self, i: int, title: str, budget: int) -> None:
        """Cut line i, longer than the budget, at whitespace (at punctuation inside a word)."""
        base = self.offsets[i]
        pieces = [m.span() for m in re.finditer(r"\S+", self.lines[i])]
        for start, end in self._fit(pieces, self.lines[i], budget):
            self.emit(base + start, base + end, title)

    def _fit(self, spans, line, budget):
        counts = self._count([line[s:e] for s, e in spans])
        start = end = total = None
        for (s, e), c in zip(spans, counts, strict=True):
            if c > budget:
                parts = [m.span() for m in re.finditer(r"\w+|[^\w\s]", line[s:e])]
                if len(parts) > 1:
                    if start is not None:
                        yield start, end
                        start = None
                    yield from self._fit([(s + ps, s + pe) for ps, pe in parts], line, budget)
                    continue
            if start is not None and total + c > budget:
                yield start, end
                start = None
            if start is None:
                start, total = s, 0
            end, total = e, total + c
        if start is not None:
            yield start, end

    def emit(self, start: int, stop: int, title: str) -> None:
        end = start + len(self.text[start:stop].rstrip())
        self.passages.append(Passage(
            file=self.file, start=start, end=end,
            start_line=bisect_right(self.offsets, start, 0, self.n),
            end_line=bisect_right(self.offsets, end - 1, 0, self.n),
            kind=self.kind, title=title, text=self.text[start:end]))


_BLOCK = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _fixed(title: str) -> Callable[[int], str]:
    return lambda line: title


def _python_units(doc: _Document):
    """The units of a python text, in order: (first line, end line, the title of a window that
    starts at a line); None when the text does not parse."""
    try:
        with warnings.catch_warnings():  # e.g. SyntaxWarning for an invalid escape in a string
            warnings.simplefilter("ignore")
            tree = ast.parse(doc.text.removeprefix("\ufeff"))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    statements, defs = [], []
    _walk(tree.body, doc, statements, defs, floor=0)
    doc.breaks = {3: sorted(defs), 2: doc.after_blank, 1: sorted(statements)}
    doc.fresh = set(defs)
    units, prev, floor = [], 0, 0
    for node in tree.body:
        if not isinstance(node, _BLOCK):
            floor = node.end_lineno
            continue
        first = _block_start(node, doc, floor)
        if any(not doc.blank[i] for i in range(prev, first)):
            units.append((prev, first, _fixed("")))
        if isinstance(node, ast.ClassDef):
            members = []
            _members(node, node.name, doc, members)
            title_at = functools.partial(_member_title, f"class {node.name}", members)
        else:
            title_at = _fixed(f"def {node.name}")
        units.append((first, node.end_lineno, title_at))
        prev = floor = node.end_lineno
    if any(not doc.blank[i] for i in range(prev, doc.n)):
        units.append((prev, doc.n, _fixed("")))
    return units


def _block_start(node, doc: _Document, floor: int) -> int:
    """0-based first line of a def/class: its decorators and the comment lines just above."""
    first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    while first > floor and doc.lines[first - 1].lstrip().startswith("#"):
        first -= 1
    return first


def _walk(body, doc, statements, defs, floor):
    """Collect the 0-based first lines of every statement and every def/class under `body`."""
    for node in body:
        if isinstance(node, _BLOCK):
            start = _block_start(node, doc, floor)
            defs.append(start)
        else:
            start = getattr(node, "lineno", floor + 1) - 1
        statements.append(start)
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            sub = getattr(node, field, None)
            if sub:
                _walk(sub, doc, statements, defs, start)
        floor = getattr(node, "end_lineno", floor)


def _members(node: ast.ClassDef, path: str, doc: _Document, out: list) -> None:
    """(first, end, title) of the methods and inner classes of a class, in order of lines."""
    prev = node.lineno
    for child in node.body:
        if isinstance(child, _BLOCK):
            first = _block_start(child, doc, prev)
            if isinstance(child, ast.ClassDef):
                out.append((first, child.end_lineno, f"class {path}.{child.name}"))
                _members(child, f"{path}.{child.name}", doc, out)
            else:
                out.append((first, child.end_lineno, f"{path}.{child.name}"))
        prev = child.end_lineno


def _member_title(title: str, members: list, s: int) -> str:
    """The title of a window starting at line s of a class: its innermost member's."""
    for first, end, name in members:
        if first > s:
            break
        if s < end:
            title = name
    return title


_FENCE = re.compile(r" {0,3}(`{3,}(?!.*`)|~{3,})")  # a backtick fence's info has no backtick
_ATX = re.compile(r" {0,3}(#{1,6})(?:[ \t]|$)")
_SETEXT = re.compile(r" {0,3}(=+|-+)[ \t]*$")


def _markdown_units(doc: _Document):
    """The sections of a markdown text, each titled by its heading path."""
    headings = []  # (first line, level, name)
    fence, para = None, None
    for i, line in enumerate(doc.lines):
        if fence:
            if re.match(rf" {{0,3}}{fence[0]}{{{len(fence)},}}[ \t]*$", line):
                fence = None
            continue
        if i == 0 and line.rstrip() == "---":  # front matter: no headings until it closes
            fence = "---"
        elif m := _FENCE.match(line):
            fence, para = m.group(1), None
        elif m := _ATX.match(line):
            headings.append((i, len(m.group(1)), _heading_name(line)))
            para = None
        elif doc.blank[i]:
            para = None
        elif para is not None and (m := _SETEXT.match(line)):
            name = " ".join(doc.lines[j].strip() for j in range(para, i))
            headings.append((para, 1 if m.group(1)[0] == "=" else 2, name))
            para = None
        elif para is None:
            para = i
    fences = [i for i in range(doc.n) if _FENCE.match(doc.lines[i])]
    doc.breaks = {3: sorted(set(doc.after_blank) | set(fences))}
    units, path, prev = [], [], 0
    title = ""
    for first, level, name in headings:
        if first > prev:
            units.append((prev, first, _fixed(title)))
        path = [p for p in path if p[0] < level] + [(level, name)]
        title = " > ".join(p[1] for p in path)
        prev = first
    units.append((prev, doc.n, _fixed(title)))
    return units
