"""FASTA files of protein sequences (`.fa`, `.fasta`, `.faa`, each also gzip-compressed `.gz`).

A record is a header line `>ID description` and the sequence lines below it, up to the next
header. What the reader accepts:
- the id is the header's first word; it names the record (and decides its split) and must be
  unique in the file;
- sequence lines hold letters (the 26 of qkv.data.residues: the 20 amino acids and B Z J X U O);
  lowercase letters are uppercased and counted;
- whitespace inside and around sequence lines, blank lines and Windows line ends are ignored;
- one `*` at the very end of a record is a translation stop: it is removed and counted.

Everything else is an error (CorpusError, a ValueError) that names the file and line: a file with
no records, residues before the first header, a header without an id, a header with no residues
after it, a repeated id, a `*` inside a sequence, a gap (`-` or `.`: aligned FASTA) or any other
character that is not a residue, a file that is not text or a damaged gzip file. Nothing is
dropped without a count: `FastaSummary` says how many records, residues, uppercased letters and
stops the file held.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qkv.data.corpus import CorpusError
from qkv.data.residues import RESIDUES

FASTA_SUFFIXES = (".fa", ".fasta", ".faa")

_ALLOWED = frozenset(RESIDUES + RESIDUES.lower())


@dataclass(frozen=True)
class FastaRecord:
    """One sequence: its id, the rest of its header, its residues (uppercase) and the line of its
    header (1-based)."""

    id: str
    description: str
    sequence: str
    line: int


@dataclass
class FastaSummary:
    """What a FASTA file held: records, residues, lowercase letters uppercased, terminal stops
    removed."""

    records: int = 0
    residues: int = 0
    uppercased: int = 0
    stops_removed: int = 0

    def describe(self) -> str:
        return (f"{self.records:,} sequences, {self.residues:,} residues; "
                f"{self.stops_removed:,} terminal '*' stops removed, "
                f"{self.uppercased:,} lowercase residues uppercased")


def is_fasta_path(path: str | os.PathLike) -> bool:
    """Whether `path` is named like a FASTA file: .fa, .fasta, .faa, or one of them + .gz."""
    suffixes = [s.lower() for s in Path(path).suffixes[-2:]]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in FASTA_SUFFIXES


def _bad_char(ch: str, where: str, column: int) -> CorpusError:
    if ch == "*":
        why = ("a '*' stop inside the sequence (only one '*' at the very end of a record is "
               "accepted, and removed)")
    elif ch in "-.":
        why = f"a gap {ch!r}: aligned FASTA is not supported; remove the gaps"
    else:
        why = (f"{ch!r} is not a residue letter (the 20 amino acids and B Z J X U O, either "
               f"case)")
    return CorpusError(f"{where}, column {column}: {why}")


class _Reader:
    """Parses lines one at a time; see the module docstring for the rules."""

    def __init__(self, name: str):
        self.name, self.summary = name, FastaSummary()
        self.records: list[FastaRecord] = []
        self.header: tuple[str, str, int] | None = None
        self.parts: list[str] = []
        self.seen: dict[str, int] = {}
        self.stop_at: int | None = None  # line of a '*' seen at the end of a sequence line
        self.stop_column = 0

    def where(self, lineno: int) -> str:
        return f"{self.name} line {lineno}"

    def line(self, lineno: int, raw: str) -> None:
        text = raw.strip()
        indent = len(raw) - len(raw.lstrip())  # columns count from the start of the raw line
        if not text:
            return
        if text.startswith(">"):
            self.finish()
            fields = text[1:].split(maxsplit=1)
            if not fields:
                raise CorpusError(f"{self.where(lineno)}: header '>' has no sequence id")
            seq_id = fields[0]
            if seq_id in self.seen:
                raise CorpusError(f"{self.where(lineno)}: sequence id {seq_id!r} repeats the "
                                  f"header on line {self.seen[seq_id]}; ids must be unique")
            self.seen[seq_id] = lineno
            self.header = (seq_id, fields[1] if len(fields) > 1 else "", lineno)
            return
        if self.header is None:
            raise CorpusError(f"{self.where(lineno)}: residues before the first '>' header")
        if self.stop_at is not None:
            raise _bad_char("*", self.where(self.stop_at), self.stop_column)
        residues = "".join(text.split())
        if residues.endswith("*"):
            self.stop_at, self.stop_column = lineno, indent + text.rfind("*") + 1
            residues = residues[:-1]
        bad = next((i for i, ch in enumerate(residues) if ch not in _ALLOWED), None)
        if bad is not None:
            column = indent + _column(text, bad)
            raise _bad_char(residues[bad], self.where(lineno), column)
        if not residues.isupper():
            self.summary.uppercased += sum(ch.islower() for ch in residues)
            residues = residues.upper()
        self.parts.append(residues)

    def finish(self) -> None:
        """Close the current record, if any."""
        if self.header is None:
            return
        seq_id, description, lineno = self.header
        sequence = "".join(self.parts)
        if not sequence:
            raise CorpusError(f"{self.where(lineno)}: header of {seq_id!r} has no residues "
                              f"after it")
        if self.stop_at is not None:
            self.summary.stops_removed += 1
        self.records.append(FastaRecord(seq_id, description, sequence, lineno))
        self.summary.records += 1
        self.summary.residues += len(sequence)
        self.header, self.parts, self.stop_at = None, [], None


def _column(text: str, index: int) -> int:
    """The 1-based column in `text` of the index-th non-whitespace character."""
    seen = -1
    for column, ch in enumerate(text, start=1):
        if not ch.isspace():
            seen += 1
            if seen == index:
                return column
    return len(text)


def parse_fasta(lines: Iterable[str], name: str = "<fasta>") -> tuple[list[FastaRecord],
                                                                      FastaSummary]:
    """The records of FASTA text given as lines, and what they held. `name` appears in errors.
    Raises CorpusError (see the module docstring)."""
    reader, count = _Reader(name), 0
    for count, text in enumerate(lines, start=1):
        reader.line(count, text)
    reader.finish()
    if not reader.records:
        raise CorpusError(f"{name} holds no sequences: none of its {count} line(s) is a '>' "
                          f"header")
    return reader.records, reader.summary


def read_fasta(path: str | os.PathLike) -> tuple[list[FastaRecord], FastaSummary]:
    """The records of a FASTA file (gzip-compressed if its name ends in .gz), and what it held.

    Raises FileNotFoundError for a missing file and CorpusError naming the file (and the line,
    where there is one) for anything the module docstring lists as an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FASTA file {path} does not exist")
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise CorpusError(f"{path} is not a readable gzip file: {e}") from None
    if b"\x00" in data:
        raise CorpusError(f"{path} is not a text file: it contains NUL bytes")
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise CorpusError(f"{path} line {lineno} is not UTF-8 text: {e.reason}") from None
    # Lines end at "\n" only (with a "\r" before it dropped), as editors count them;
    # str.splitlines would also split at \x0b, \x0c, \x1c-\x1e, \x85, \u2028 and \u2029.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines[-1] == "":  # the newline that ends the last line
        lines.pop()
    return parse_fasta(lines, str(path))
