"""A retrieval benchmark built from the running Python's standard library: its builder, metrics,
a BM25 and a random baseline, and the reader's cost with and without retrieval.

Modules: every `*.py` file under the standard library's folder (`sysconfig` path "stdlib"),
packages' modules included, that has at least `min_lines` lines (counted as "\\n"-ended lines),
except test suites (any folder named `test`, `tests` or `idle_test` on the way), installed
third-party code (`site-packages`, `dist-packages`), and generated files (GENERATED:
`_sysconfigdata*` and `pydoc_data/topics.py`). A module is named by its path relative to that
folder, "/"-separated: "asyncio/base_events.py".

Targets: every function, method and class (at any depth) with a docstring; the query is the
docstring's first sentence (`first_sentence`); a query of fewer than MIN_QUERY_WORDS words (or
none: a docstring that opens with a doctest) is skipped and counted in
`Benchmark.skipped["short_query"]`. `Target.line` is the line of its
`def`/`class` keyword (not of a decorator), `end_line` its last line.

Documents: each module with every comment and every statement that is a bare string literal
(docstrings of the module, classes and functions, and the attribute docstrings some modules
write after an assignment) blanked out, so that a match is never a copy (`strip_docs`). Blanking
keeps every line where it was: a target's line is the same in the module and in its document.
"""

from __future__ import annotations

import ast
import fnmatch
import inspect
import io
import re
import sysconfig
import tokenize
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                           "__pycache__"})
GENERATED = ("_sysconfigdata*", "pydoc_data/topics.py")  # fnmatch patterns, name or path
MIN_QUERY_WORDS = 3
ABBREVIATIONS = frozenset({"e.g.", "i.e.", "etc.", "vs.", "cf.", "approx.", "resp."})
SIGNATURE = re.compile(r"[\w.]+\(.*\)(\s*->.*)?")  # "name(args) -> result"
MRR_CUTOFF = 100  # MRR counts a first relevant passage only within the top 100


@dataclass(frozen=True)
class Target:
    """One query and where its answer is."""

    query: str  # first sentence of the docstring
    document: str  # the module's name in Benchmark.documents, e.g. "asyncio/base_events.py"
    name: str  # qualified name, "BaseEventLoop.run_until_complete"
    kind: str  # "function" | "class"
    line: int  # 1-based line of the `def`/`class` statement in the stripped document
    end_line: int


@dataclass
class Benchmark:
    """The stripped documents, the targets, the original modules' sizes
    ({"name", "lines", "tokens"}: MiniLM WordPiece tokens, `count_tokens`) and what was left
    out: {"short_query": targets skipped, "unreadable": modules that did not decode or parse}."""

    documents: dict[str, str]
    targets: list[Target]
    modules: list[dict]
    python: str
    skipped: dict = field(default_factory=lambda: {"short_query": 0, "unreadable": []})


def _root(root) -> Path:
    path = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    if not path.is_dir():
        raise ValueError(f"root must be a folder, got {str(path)!r}")
    return path


def _line_count(text: str) -> int:
    return text.count("\n") + (bool(text) and not text.endswith("\n"))


def _read(path: Path) -> str:
    with tokenize.open(path) as f:  # honours a coding cookie; newlines become "\n"
        return f.read()


def stdlib_modules(min_lines: int = 1000, root=None) -> list[Path]:
    """The benchmark's module files under `root` (default: this Python's standard library)
    with at least `min_lines` lines, sorted by path (see the module docstring for the rule).
    Raises ValueError for a min_lines below 1 or a root that is not a folder."""
    if isinstance(min_lines, bool) or not isinstance(min_lines, int) or min_lines < 1:
        raise ValueError(f"min_lines must be an int >= 1, got {min_lines!r}")
    base = _root(root)
    found = []
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]) or any(
                fnmatch.fnmatch(rel.name, g) or fnmatch.fnmatch(rel.as_posix(), g)
                for g in GENERATED):
            continue
        try:
            if _line_count(_read(path)) >= min_lines:
                found.append(path)
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue  # left for build_benchmark to count as unreadable only if big enough
    return found


def first_sentence(docstring: str) -> str:
    """The first sentence of a docstring, its whitespace collapsed to single spaces.

    The docstring is cleaned as `inspect.cleandoc` does and split into paragraphs at blank
    lines. A first paragraph that is only a call signature ("reduce(function, iterable[,
    initial]) -> value": a name, parentheses, an optional "-> result", no period ending it) is
    passed over when another paragraph follows. In the paragraph left, the sentence runs to the
    first period followed by whitespace or by the end, unless the word ending there is an
    abbreviation (ABBREVIATIONS: "e.g.", "i.e.", "etc.", ...), and keeps its period; a
    paragraph with no such period is the whole sentence. A period inside a word ("os.path",
    "3.14") ends nothing. "" for an empty docstring and for one that opens with a doctest
    (">>>"), which has no sentence to ask with.
    """
    text = inspect.cleandoc(docstring or "").strip()
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n[ \t]*\n", text)]
    if (len(paragraphs) > 1 and SIGNATURE.fullmatch(paragraphs[0])
            and not re.search(r"\.(\s|$)", paragraphs[0])):
        paragraphs = paragraphs[1:]
    words = paragraphs[0]
    if words.startswith(">>>"):
        return ""
    for m in re.finditer(r"\.(?=\s|$)", words):
        word = words[:m.end()].rsplit(" ", 1)[-1].lstrip("([{\"'`").lower()
        if word not in ABBREVIATIONS:
            return words[:m.end()]
    return words


def _is_string(stmt: ast.stmt) -> bool:
    return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
            and isinstance(stmt.value.value, str))


def _string_edits(tree: ast.AST) -> list[tuple[ast.stmt, str]]:
    """Each bare string statement with its replacement: "pass" where the body would be left
    empty (or the next statement follows on its last line, after a `;`), else ""."""
    edits = []
    for node in ast.walk(tree):
        for name in ("body", "orelse", "finalbody"):
            body = getattr(node, name, None)
            if not isinstance(body, list):
                continue
            only_strings = all(_is_string(s) for s in body)
            for i, stmt in enumerate(body):
                if _is_string(stmt):
                    shared = i + 1 < len(body) and body[i + 1].lineno == stmt.end_lineno
                    edits.append((stmt, "pass" if (only_strings and i == 0) or shared else ""))
    return edits


def strip_docs(source: str, tree: ast.Module | None = None) -> str:
    """`source` with every comment and every bare string statement (docstrings) blanked.

    Every line stays where it was: a removed string's lines become empty lines, and `pass`
    takes its place where it was a body's only statement, so the result parses whenever the
    source does. Trailing whitespace left on a line by a removed comment or string goes too.
    Raises SyntaxError if `source` does not parse (`tree`, its parse, may be given).
    """
    tree = ast.parse(source) if tree is None else tree
    lines = source.split("\n")
    starts = [0]
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line) + 1)

    def offset(row: int, col: int, in_bytes: bool) -> int:  # row 1-based
        if in_bytes:  # ast columns count UTF-8 bytes
            col = len(lines[row - 1].encode()[:col].decode())
        return starts[row - 1] + col

    def left(row: int, start: int) -> int:  # back over the blanks before `start` on its line
        return starts[row - 1] + len(source[starts[row - 1]:start].rstrip(" \t\f"))

    spans = []  # (start, end, replacement): character offsets into source
    for stmt, replacement in _string_edits(tree):
        start = offset(stmt.lineno, stmt.col_offset, True)
        spans.append((start if replacement else left(stmt.lineno, start),
                      offset(stmt.end_lineno, stmt.end_col_offset, True), replacement))
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            spans.append((left(tok.start[0], offset(*tok.start, False)),
                          offset(*tok.end, False), ""))
    out = source
    for start, end, replacement in sorted(spans, reverse=True):
        gone = out[start:end]
        rest = out[end:]
        tail = len(rest) - len(rest.lstrip(" \t")) if rest[:1] in (" ", "\t") else 0
        if rest[tail:tail + 1] in ("\n", ""):  # nothing else after it on its line
            end += tail
        out = out[:start] + replacement + "\n" * gone.count("\n") + out[end:]
    return out


def _targets(tree: ast.Module, document: str) -> tuple[list[Target], int]:
    """The documented functions and classes of a module, and how many were skipped for a short
    query."""
    found, short = [], 0

    def visit(node: ast.AST, prefix: str) -> None:
        nonlocal short
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                doc = ast.get_docstring(child, clean=True)
                if doc is not None:
                    query = first_sentence(doc)
                    if len(query.split()) < MIN_QUERY_WORDS:
                        short += 1
                    else:
                        kind = "class" if isinstance(child, ast.ClassDef) else "function"
                        found.append(Target(query, document, name, kind, child.lineno,
                                            child.end_lineno))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found, short


def count_tokens(texts: Sequence[str]) -> list[int]:
    """MiniLM WordPiece tokens of each text, without [CLS] and [SEP] and never truncated:
    qkv.retrieval.passages's own count (it adds over lines)."""
    from qkv.retrieval.passages import wordpiece_counts

    return wordpiece_counts(list(texts))


def build_benchmark(min_lines: int = 1000, root=None, *, modules: Sequence[Path] | None = None
                    ) -> Benchmark:
    """The benchmark over `stdlib_modules(min_lines, root)`, or over `modules` (paths under
    `root`) when given. A module that does not decode or parse is left out and named in
    `skipped["unreadable"]`. Raises ValueError as stdlib_modules does."""
    import platform

    base = _root(root)
    paths = stdlib_modules(min_lines, base) if modules is None else list(modules)
    bench = Benchmark({}, [], [], platform.python_version())
    for path in paths:
        name = Path(path).relative_to(base).as_posix()
        try:
            source = _read(Path(path))
            tree = ast.parse(source)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            bench.skipped["unreadable"].append(name)
            continue
        bench.documents[name] = strip_docs(source, tree)
        targets, short = _targets(tree, name)
        bench.targets += targets
        bench.skipped["short_query"] += short
        bench.modules.append({"name": name, "lines": _line_count(source),
                              "tokens": sum(count_tokens(source.split("\n")))})
    return bench


def _contains(passage, target: Target) -> bool:
    return passage.start_line <= target.line <= passage.end_line


def relevant(passages: Sequence, target: Target) -> set[int]:
    """Indices of the passages of target.document whose line span contains target.line."""
    return {i for i, p in enumerate(passages) if p.file == target.document
            and _contains(p, target)}


def relevant_sets(passages: Sequence, targets: Sequence[Target]) -> list[set[int]]:
    """`relevant(passages, t)` for each target, the passages grouped by document once."""
    by_file: dict[str, list[int]] = {}
    for i, p in enumerate(passages):
        by_file.setdefault(p.file, []).append(i)
    return [{i for i in by_file.get(t.document, ()) if _contains(passages[i], t)}
            for t in targets]


def metrics(rankings: Sequence[Sequence[int]], relevant_sets: Sequence[set[int]],
            ks: Sequence[int] = (1, 5, 10), cutoff: int = MRR_CUTOFF) -> dict:
    """recall@k for each k and MRR over the first `cutoff` ranks, averaged over queries.

    recall@k is the fraction of queries with at least one relevant passage among their first k
    (a target's line lies in one passage, or two where windows overlap, and finding either
    answers it). MRR is the mean of 1 / (rank of the first relevant passage), 0 when none is
    within the first `cutoff`. Returns {"queries", "recall@K"..., "mrr", "mrr_cutoff"}. Raises
    ValueError for no queries, a length mismatch or a query with no relevant passage.
    """
    if len(rankings) != len(relevant_sets):
        raise ValueError(f"rankings and relevant_sets must have the same length, got "
                         f"{len(rankings)} and {len(relevant_sets)}")
    if not rankings:
        raise ValueError("rankings must hold at least one query, got none")
    firsts = []
    for i, (ranking, rel) in enumerate(zip(rankings, relevant_sets, strict=True)):
        if not rel:
            raise ValueError(f"relevant_sets[{i}] is empty: every query needs a relevant "
                             "passage")
        firsts.append(next((r for r, p in enumerate(list(ranking)[:cutoff], 1) if p in rel),
                           None))
    n = len(firsts)
    out: dict = {"queries": n}
    for k in ks:
        out[f"recall@{k}"] = sum(f is not None and f <= k for f in firsts) / n
    out["mrr"] = sum(1 / f for f in firsts if f is not None) / n
    out["mrr_cutoff"] = cutoff
    return out


def code_tokens(text: str) -> list[str]:
    """BM25's tokens: each identifier-like word ([A-Za-z0-9_]+), lowercased, and, when it has
    more than one part, its parts split on "_" and at camelCase humps ("HTTPServer" -> http,
    server); tokens in bm25s's English stopword list are dropped. No stemming."""
    from bm25s.stopwords import STOPWORDS_EN

    out = []
    for word in re.findall(r"[A-Za-z0-9_]+", text):
        parts = [p.lower() for piece in word.split("_")
                 for p in re.findall(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+", piece)]
        whole = word.lower()
        out += [t for t in ([whole] + (parts if parts != [whole] else []))
                if t not in STOPWORDS_EN]
    return out


def _text(passage) -> str:
    return passage if isinstance(passage, str) else passage.embed_text


def bm25_rankings(passages: Sequence, queries: Sequence[str], k: int) -> list[list[int]]:
    """The first k passage indices for each query by BM25 (bm25s, its defaults: Lucene
    variant, k1 = 1.5, b = 0.75) over `code_tokens` of each passage's embed_text (what the
    dense index embeds; a str counts as its own text). Raises ValueError for no passages or
    k < 1."""
    import bm25s

    if not passages:
        raise ValueError("passages must not be empty")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(k, len(passages))
    retriever = bm25s.BM25()
    retriever.index([code_tokens(_text(p)) for p in passages], show_progress=False)
    tokens = [code_tokens(q) or ["<none>"] for q in queries]
    docs, _ = retriever.retrieve(tokens, k=k, show_progress=False, n_threads=0)
    return docs.tolist()


def random_rankings(n_passages: int, n_queries: int, k: int, seed: int = 0) -> list[list[int]]:
    """For each query, min(k, n_passages) distinct passage indices drawn uniformly with
    numpy's default generator seeded with `seed` (the same call gives the same lists)."""
    import numpy as np

    if n_passages < 1 or k < 1:
        raise ValueError(f"n_passages and k must be at least 1, got {n_passages} and {k}")
    rng = np.random.default_rng(seed)
    return [rng.choice(n_passages, size=min(k, n_passages), replace=False).tolist()
            for _ in range(n_queries)]


def retrieval_cost(bench: Benchmark, passages: Sequence, rankings: Sequence[Sequence[int]],
                   k: int = 5, counter: Callable[[Sequence[str]], list[int]] = count_tokens
                   ) -> list[dict]:
    """Per module: its whole original size in tokens against what a reader attends with
    retrieval, the top-k passages of each of its targets' rankings (the passages' own token
    counts summed, averaged over the module's queries). Rows: {"name", "lines", "tokens",
    "queries", "retrieved_tokens" (None for a module without targets), "ratio"}."""
    lengths = counter([p.text for p in passages])
    per: dict[str, list[int]] = {}
    for target, ranking in zip(bench.targets, rankings, strict=True):
        per.setdefault(target.document, []).append(sum(lengths[i] for i in ranking[:k]))
    rows = []
    for m in bench.modules:
        got = per.get(m["name"], [])
        mean = sum(got) / len(got) if got else None
        rows.append({**m, "queries": len(got), "retrieved_tokens": mean,
                     "ratio": m["tokens"] / mean if mean else None})
    return rows


def reader_plans(seq_lens: Mapping[str, int], model: str = "llama-1b", dtype: str = "bf16",
                 rates=None) -> dict[str, dict]:
    """`qkv.plan.make_plan` of one prefill pass of `model` (batch 1, `dtype`, CPU backends)
    over each labelled length: {label: {"seq_len", "time_source", "backends": {backend:
    {"peak_bytes", "attention_bytes", "seconds"}}}}. `rates`: qkv.plan rates (None: nominal,
    marked uncalibrated)."""
    from qkv.plan import load_model, make_plan

    out = {}
    for label, n in seq_lens.items():
        plan = make_plan(load_model(model, n), n, 1, dtype, "prefill", rates=rates)
        out[label] = {"seq_len": n, "time_source": plan.time_source, "backends": {
            b.backend: {"peak_bytes": b.memory["total"], "attention_bytes":
                        b.memory["attention"], "seconds": b.seconds} for b in plan.backends}}
    return out


__all__ = ["Benchmark", "Target", "bm25_rankings", "build_benchmark", "code_tokens",
           "count_tokens", "first_sentence", "metrics", "random_rankings", "reader_plans",
           "relevant", "relevant_sets", "retrieval_cost", "stdlib_modules", "strip_docs"]
