"""Search results: a hit is a passage, its cosine score, and the sentence inside it that best
matches the query.

Sentences (`sentences`): in prose (text and Markdown) a sentence ends at `.`, `!` or `?` (and any
closing quotes or brackets) followed by whitespace and a character that is not a lowercase letter
("e.g. this" does not end one); a blank line, a list item, a quote, a table row or a code fence
also starts a new one; a heading, and each line inside a fenced code block, is one; rules and
setext underlines are left out. In Python each non-blank line is one. Spans are exact offsets
into the passage's text, without the whitespace around them. All sentences of all hits are
embedded together, in one call of the encoder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from qkv.retrieval.passages import Passage

_END = re.compile(r"[.!?]+[\"')\]]*\s+(?=[^a-z\s])")
_BLOCK_START = re.compile(r"\s*(#{1,6}\s|[-*+]\s|>|\d+[.)]\s|\|)")
_FENCE = re.compile(r"\s*(```|~~~)")
_HEADING = re.compile(r"\s*#{1,6}(\s.*)?")
_RULE = re.compile(r"\s*([=-]\s*){3,}")  # a setext underline or a thematic break


@dataclass
class Hit:
    """One search result."""

    rank: int                  # 1-based
    score: float               # cosine similarity of the query and the passage
    passage: Passage
    sentence: tuple[int, int]  # offsets into passage.text of the best-matching sentence
    sentence_score: float      # cosine similarity of the query and that sentence

    @property
    def sentence_text(self) -> str:
        return self.passage.text[self.sentence[0]:self.sentence[1]]

    def to_dict(self) -> dict:
        """JSON-able: rank, score, file, start_line, end_line, start, end (offsets into the
        file), title, text, and sentence {start, end (offsets into the file), line, text,
        score}."""
        p, (s, e) = self.passage, self.sentence
        return {"rank": self.rank, "score": self.score, "file": p.file,
                "start_line": p.start_line, "end_line": p.end_line, "start": p.start,
                "end": p.end, "title": p.title, "text": p.text,
                "sentence": {"start": p.start + s, "end": p.start + e,
                             "line": p.start_line + p.text.count("\n", 0, s),
                             "text": p.text[s:e], "score": self.sentence_score}}


def _strip(text: str, start: int, end: int) -> tuple[int, int] | None:
    piece = text[start:end]
    left = len(piece) - len(piece.lstrip())
    right = len(piece.rstrip())
    return (start + left, start + right) if right > left else None


def _lines(text: str) -> list[tuple[int, int]]:
    """(start, end) of each line of `text`, its line end left out."""
    spans, start = [], 0
    for line in text.splitlines(keepends=True):
        spans.append((start, start + len(line.rstrip("\r\n"))))
        start += len(line)
    return spans


def sentences(text: str, kind: str) -> list[tuple[int, int]]:
    """The sentences of a passage's text as (start, end) offsets, in order (see the module's
    docstring). A text with no sentence (only whitespace) gives []."""
    if kind == "python":
        return [span for s, e in _lines(text) if (span := _strip(text, s, e))]
    units, unit_start, fenced = [], None, False  # units: runs of lines split at block starts
    for s, e in _lines(text):
        line = text[s:e]
        fence = _FENCE.match(line) is not None
        if fenced or fence or not line.strip() or _BLOCK_START.match(line) or \
                _RULE.fullmatch(line):
            if unit_start is not None:
                units.append((unit_start, s))
            unit_start = None
        if fence:
            fenced = not fenced
        elif fenced or _HEADING.fullmatch(line):
            units.append((s, e))  # a line of code, or a heading, is a unit of its own
        elif _RULE.fullmatch(line):
            pass
        elif line.strip() and unit_start is None:
            unit_start = s
    if unit_start is not None:
        units.append((unit_start, len(text)))
    spans = []
    for s, e in units:
        cut = s
        for m in _END.finditer(text, s, e):
            if (span := _strip(text, cut, m.end())):
                spans.append(span)
            cut = m.end()
        if (span := _strip(text, cut, e)):
            spans.append(span)
    return spans


def hits_with_sentences(encoder, passages: list[Passage], queries: torch.Tensor,
                        scores: torch.Tensor, ids: torch.Tensor, *, batch_size: int = 32,
                        backend: str = "auto") -> list[list[Hit]]:
    """Hits for (Q, k) `scores` and passage `ids` of (Q, dim) unit query vectors, each with the
    sentence of its passage closest to the query (the sentences of all the hits' passages are
    embedded in one call)."""
    chosen = sorted(set(ids.flatten().tolist()))
    spans = {i: sentences(passages[i].text, passages[i].kind) or [(0, len(passages[i].text))]
             for i in chosen}
    texts = [passages[i].text[s:e] for i in chosen for s, e in spans[i]]
    where, offset = {}, 0
    for i in chosen:
        where[i] = offset
        offset += len(spans[i])
    vectors = torch.empty(0, queries.shape[1])
    if texts:
        vectors = encoder.encode_ids(encoder.tokenize(texts), batch_size=batch_size,
                                     backend=backend).float().cpu()  # (S, dim)
    out = []
    for q, row_scores, row_ids in zip(queries, scores.tolist(), ids.tolist(), strict=True):
        row = []
        for rank, (score, i) in enumerate(zip(row_scores, row_ids, strict=True), start=1):
            sims = vectors[where[i]:where[i] + len(spans[i])] @ q  # (sentences,)
            best = int(sims.argmax())
            row.append(Hit(rank, float(score), passages[i], spans[i][best], float(sims[best])))
        out.append(row)
    return out
