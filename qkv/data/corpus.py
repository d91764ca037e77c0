"""Text corpora: the embedded stdlib corpus, folders, globs and JSONL files, split by document
or by position.

The default corpus is the source of the running interpreter's standard library: it is on every
machine that runs qkv, so training needs no download. Which `*.py` files it holds:

- everything under `sysconfig.get_paths()["stdlib"]`, except
- site-packages / dist-packages (third-party code, differs per machine),
- test suites: any directory named `test`, `tests` or `idle_test` (half the bytes, and full of
  deliberately odd inputs such as broken encodings),
- generated files: `encodings/` (codec tables), `pydoc_data/` (the docs as one string) and
  `_sysconfigdata_*.py` (the build configuration of this machine),
- files that are empty or are not UTF-8 text (skipped silently here; for a user's corpus they are
  an error).

Documents are split into train / validation / test by a hash of their relative path, not by a
random draw: the same file lands in the same split on every machine and every Python patch
release, and a file added in a new release moves no other file. A corpus of one file or a handful
is split by position instead: the head of every document trains, its tail validates and tests.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import itertools
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.90, 0.05, 0.05)
SPLIT_MODES = ("auto", "document", "position")

_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                     "encodings", "pydoc_data"}
_STDLIB_SKIP_PREFIXES = ("_sysconfigdata_",)


class CorpusError(ValueError):
    """A corpus that cannot be read: missing, empty, not text, or malformed."""


@dataclass(frozen=True)
class Document:
    """One text document. `name` is its '/'-separated path relative to the corpus root
    (for JSONL, "file.jsonl:LINE"); the split is a function of the name alone."""

    name: str
    text: str

    @property
    def nbytes(self) -> int:
        return len(self.text.encode("utf-8"))


def _unit_hash(name: str, salt: str) -> float:
    """A number in [0, 1) that depends only on (salt, name): stable across machines."""
    digest = hashlib.sha256(f"{salt}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(name: str, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> str:
    """The split ("train", "validation" or "test") that document `name` belongs to."""
    _check_fractions(fractions)
    u = _unit_hash(name, "split")
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "validation"
    return "test"


def _check_fractions(fractions) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got "
                         f"{tuple(fractions)}")


def decode_text(data: bytes, name: str) -> str:
    """`data` as UTF-8 text; raises CorpusError naming `name` if it is binary or undecodable."""
    if b"\x00" in data:
        raise CorpusError(f"{name} is not a text file: it contains NUL bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{name} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    return text.removeprefix("\ufeff")


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(relative name, path) of the stdlib source files the default corpus holds, sorted."""
    root = stdlib_root() if root is None else Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS
                             and not d.startswith(("config-", "lib-dynload")))
        for f in filenames:
            if f.endswith(".py") and not f.startswith(_STDLIB_SKIP_PREFIXES):
                path = Path(dirpath) / f
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _folder_files(root: Path) -> list[tuple[str, Path]]:
    """Every regular file under `root`, hidden files and directories excluded."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for f in filenames:
            if not f.startswith("."):
                path = Path(dirpath) / f
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _glob_files(pattern: str) -> list[tuple[str, Path]]:
    """Files matching `pattern` (recursive `**` allowed), named relative to its fixed prefix."""
    fixed = list(itertools.takewhile(lambda p: not _glob.has_magic(p), Path(pattern).parts[:-1]))
    root = Path(*fixed) if fixed else Path(".")
    paths = [Path(p) for p in _glob.glob(pattern, recursive=True) if Path(p).is_file()]
    return sorted((p.relative_to(root).as_posix(), p) for p in paths)


def _jsonl_documents(path: Path, text_key: str) -> Iterator[Document]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path.name}:{lineno}"
            line = decode_text(raw, f"{path} line {lineno}").strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path} line {lineno} is not valid JSON: {e.msg}") from None
            if not isinstance(record, dict):
                raise CorpusError(f"{path} line {lineno} is not a JSON object")
            if text_key not in record:
                raise CorpusError(f"{path} line {lineno} has no field {text_key!r} "
                                  f"(fields: {sorted(record)}); set text_key to the field "
                                  f"that holds the text")
            text = record[text_key]
            if not isinstance(text, str):
                raise CorpusError(f"{path} line {lineno}: field {text_key!r} is "
                                  f"{type(text).__name__}, not a string")
            if text:
                yield Document(where, text)


@dataclass(frozen=True)
class CorpusConfig:
    """Where a corpus comes from and how much of it to use.

    source: "stdlib", a folder, a glob pattern, a `.jsonl` file (one object per line), or a
    protein corpus: "proteins" or a FASTA file (qkv.data.proteins; split by sequence id).
    text_key: the JSONL field that holds the text.
    suffixes: for folders and globs, keep only files with these suffixes (e.g. (".py",)).
    max_files / max_bytes: caps on the corpus (by document: shared among the splits by their
    fractions; by position: on the whole, the last document cut short to fit max_bytes).
    fractions: the train / validation / test shares.
    split: "document" puts each document in one split (by a hash of its name); "position" cuts
    every document, its first fractions[0] going to train, then validation, then test, so one
    file or a handful of them can train; "auto" is "document" when that gives every split with a
    nonzero fraction at least one file, else "position" (JSONL records: always "document").
    """

    source: str = "stdlib"
    text_key: str = "text"
    suffixes: tuple[str, ...] | None = None
    max_files: int | None = None
    max_bytes: int | None = None
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    split: str = "auto"

    def __post_init__(self):
        _check_fractions(self.fractions)
        if self.split not in SPLIT_MODES:
            raise ValueError(f"split must be one of {list(SPLIT_MODES)}, got {self.split!r}")
        for name in ("max_files", "max_bytes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")


def cut_points(text: str, fractions: tuple[float, float, float]) -> tuple[int, int]:
    """Where `text` is cut into its train / validation / test parts: the character offsets at
    fractions[0] and fractions[0] + fractions[1] of it, each moved back to the start of its line
    when that line starts after the previous cut (a cut at the very end stays there)."""
    cuts, previous = [], 0
    for share in (fractions[0], fractions[0] + fractions[1]):
        at = min(len(text), round(len(text) * share))
        line_start = text.rfind("\n", previous, at) + 1
        if previous < line_start and at < len(text):
            at = line_start
        cuts.append(at)
        previous = at
    return cuts[0], cuts[1]


class Corpus:
    """Documents grouped into the splits "train", "validation" and "test".

    Build one with `Corpus.load(...)` (see CorpusConfig) or from documents directly; `split` is
    "document" or "position" (see CorpusConfig).
    """

    summary: str = ""  # a FASTA source: what it held, what reading it changed or left out

    def __init__(self, documents: list[Document], fractions=DEFAULT_FRACTIONS,
                 split: str = "document"):
        _check_fractions(fractions)
        if split not in ("document", "position"):
            raise ValueError(f"split must be 'document' or 'position', got {split!r}")
        self.fractions, self.split = tuple(fractions), split
        self.splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
        for doc in documents:
            if split == "document":
                self.splits[split_of(doc.name, self.fractions)].append(doc)
                continue
            a, b = cut_points(doc.text, self.fractions)
            for s, part in zip(SPLITS, (doc.text[:a], doc.text[a:b], doc.text[b:]), strict=True):
                if part:
                    self.splits[s].append(Document(doc.name, part))

    @classmethod
    def load(cls, source: str = "stdlib", **options) -> Corpus:
        """Read the corpus that `CorpusConfig(source, **options)` describes.

        Raises FileNotFoundError for a missing source, CorpusError for a corpus that is empty or
        holds a file that is not UTF-8 text (the message names the file), or a JSONL line that is
        malformed or lacks the text field (the message names the line).
        """
        config = CorpusConfig(source, **options)
        from qkv.data.proteins import is_protein_source, load_protein_corpus  # builds on this
        if is_protein_source(source):
            return load_protein_corpus(config)
        files = _source_files(config)
        split = _resolve_split(config, files)
        caps = _Caps(config, split)
        if files is None:
            documents = list(caps.documents(_jsonl_documents(Path(source), config.text_key)))
        else:
            documents = list(caps.files(files, strict=source != "stdlib"))
        if not documents:
            raise CorpusError(f"corpus {source!r} holds no non-empty text documents")
        return cls(documents, config.fractions, split)

    def __getitem__(self, split: str) -> list[Document]:
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self.splits[split]

    @property
    def train(self) -> list[Document]:
        return self.splits["train"]

    @property
    def validation(self) -> list[Document]:
        return self.splits["validation"]

    @property
    def test(self) -> list[Document]:
        return self.splits["test"]

    def texts(self, split: str) -> list[str]:
        return [d.text for d in self[split]]

    def stats(self) -> dict[str, dict[str, int]]:
        """{split: {"files": n, "bytes": n}}."""
        return {s: {"files": len(docs), "bytes": sum(d.nbytes for d in docs)}
                for s, docs in self.splits.items()}

    def describe_split(self) -> str:
        """How the documents were split, e.g. "by document, 90/5/5"."""
        shares = "/".join(f"{100 * f:g}" for f in self.fractions)
        return f"by {self.split}, {shares}"

    def __repr__(self) -> str:
        parts = ", ".join(f"{s}={v['files']} files/{v['bytes'] / 1e6:.2f} MB"
                          for s, v in self.stats().items())
        return f"Corpus({parts})"


def _source_files(config: CorpusConfig) -> list[tuple[str, Path]] | None:
    """(name, path) of the files `config.source` holds, or None for a JSONL file."""
    source = config.source
    if source == "stdlib":
        return stdlib_files()
    path = Path(source)
    if path.is_dir():
        files = _folder_files(path)
    elif path.is_file() and path.suffix == ".jsonl":
        return None
    elif path.is_file():
        files = [(path.name, path)]
    elif _glob.has_magic(source):
        files = _glob_files(source)
        if not files:
            raise CorpusError(f"glob {source!r} matches no files")
    else:
        raise FileNotFoundError(f"corpus source {source!r} does not exist (expected 'stdlib', a "
                                f"folder, a glob, or a .jsonl file)")
    if config.suffixes is not None:
        files = [(n, p) for n, p in files if p.suffix in config.suffixes]
    return files


def _resolve_split(config: CorpusConfig, files: list[tuple[str, Path]] | None) -> str:
    """"document" or "position": config.split, with "auto" decided from the file names."""
    if config.split != "auto":
        return config.split
    if files is None:
        return "document"
    filled = {split_of(name, config.fractions) for name, _ in files}
    wanted = {s for s, f in zip(SPLITS, config.fractions, strict=True) if f > 0}
    return "document" if wanted <= filled else "position"


def _shares(cap: int | None, fractions) -> list[float]:
    """Each part's share of a cap: at least one unit for any part with a nonzero fraction."""
    if cap is None:
        return [float("inf")] * len(fractions)
    return [max(1, round(cap * f)) if f > 0 else 0 for f in fractions]


def _utf8_prefix(data: bytes, n: int) -> bytes:
    """The first n bytes of `data` or fewer, never ending inside a UTF-8 character."""
    if n >= len(data):
        return data
    while n > 0 and data[n] & 0xC0 == 0x80:
        n -= 1
    return data[:n]


class _Caps:
    """What is left of max_files / max_bytes: per split (by document) or for the whole corpus
    (by position, where the document that reaches max_bytes is cut short to fit)."""

    def __init__(self, config: CorpusConfig, split: str):
        self.config, self.by_position = config, split == "position"
        fractions = (1.0,) if self.by_position else config.fractions
        self.files_left = _shares(config.max_files, fractions)
        self.bytes_left = _shares(config.max_bytes, fractions)

    def _part(self, name: str) -> int:
        return 0 if self.by_position else SPLITS.index(split_of(name, self.config.fractions))

    def room(self, name: str, nbytes: int) -> int:
        """How many of a document's nbytes may be taken: all, a prefix (by position), or 0."""
        part = self._part(name)
        if self.files_left[part] <= 0 or self.bytes_left[part] <= 0:
            return 0
        if nbytes <= self.bytes_left[part]:
            return nbytes
        return int(self.bytes_left[part]) if self.by_position else 0

    def take(self, name: str, nbytes: int) -> None:
        part = self._part(name)
        self.files_left[part] -= 1
        self.bytes_left[part] -= nbytes

    def files(self, files, strict: bool) -> Iterator[Document]:
        """Read files in a fixed pseudo-random order until the caps are used.

        A file too large for what is left of its split's byte budget is passed over (by
        position: read up to the budget). Unreadable text raises (strict) or is skipped.
        """
        for name, path in sorted(files, key=lambda f: _unit_hash(f[0], "order")):
            room = self.room(name, path.stat().st_size)
            if room <= 0:
                continue
            with path.open("rb") as f:
                data = _utf8_prefix(f.read(room + 4), room)
            try:
                text = decode_text(data, str(path))
            except CorpusError:
                if strict:
                    raise
                continue
            if text:
                self.take(name, len(text.encode("utf-8")))
                yield Document(name, text)

    def documents(self, documents) -> Iterator[Document]:
        """The caps for documents that are not files (JSONL records), taken in file order."""
        for doc in documents:
            room = self.room(doc.name, doc.nbytes)
            if room <= 0:
                continue
            if room < doc.nbytes:
                doc = Document(doc.name, _utf8_prefix(doc.text.encode("utf-8"), room).decode())
            self.take(doc.name, doc.nbytes)
            yield doc
