"""Building an index: find the files, split them into passages, embed the passages, reuse what
an earlier build at the same place already embedded, and write the result (qkv.retrieval.index).

File paths are stored as the folder walk finds them: relative to the current directory when the
file lies under it, absolute otherwise. A rebuild reuses the passages and vectors of every file
whose content (sha256) and kind are unchanged, wherever it now lies, when the model and the
settings are the same; files not named in the new build drop out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qkv.retrieval import passages as splitting
from qkv.retrieval.index import (
    MANIFEST,
    BuildReport,
    Index,
    IndexFormatError,
    default_encoder,
    load_index,
    model_identity,
    same_model,
    save_index,
)
from qkv.retrieval.passages import KINDS, Passage, kind_of, split_text


@dataclass
class _Document:
    name: str
    text: str
    sha256: str
    bytes: int

    @property
    def key(self) -> tuple[str, str]:  # what a reused passage list depends on, with the model
        return self.sha256, kind_of(self.name)


def _check_settings(max_tokens, overlap, batch_size, encoder) -> None:
    for name, value, low in (("max_tokens", max_tokens, 16), ("overlap", overlap, 0),
                             ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if overlap >= max_tokens:
        raise ValueError(f"overlap must be less than max_tokens ({max_tokens}), got {overlap}")
    if max_tokens > encoder.max_length - 2:
        raise ValueError(f"max_tokens must be at most {encoder.max_length - 2} (the model takes "
                         f"{encoder.max_length} tokens with [CLS] and [SEP]), got {max_tokens}")


def index_texts(texts: Mapping[str, str], *, encoder=None, max_tokens: int = 200,
                overlap: int = 32, batch_size: int = 32, backend: str = "auto",
                progress: Callable[[int, int], None] | None = None) -> Index:
    """An in-memory index of `texts` (name -> text); each text's kind comes from its name's
    suffix (`kind_of`). See build_index for the rest."""
    if not isinstance(texts, Mapping):
        raise ValueError(f"texts must be a mapping of name -> text, got {type(texts).__name__}")
    documents = []
    for name, text in texts.items():
        if not isinstance(name, str) or not isinstance(text, str):
            raise ValueError(f"texts must map str names to str texts; got {name!r}: "
                             f"{type(text).__name__}")
        data = text.encode("utf-8", "surrogatepass")
        documents.append(_Document(name, text, hashlib.sha256(data).hexdigest(), len(data)))
    encoder = default_encoder() if encoder is None else encoder
    _check_settings(max_tokens, overlap, batch_size, encoder)
    settings = _settings(max_tokens, overlap)
    return _embed(documents, encoder, settings, {}, batch_size, backend, progress)


def _settings(max_tokens: int, overlap: int) -> dict:
    """What decides how a file is split; an index made under other settings is re-embedded."""
    return {"max_tokens": max_tokens, "overlap": overlap, "splitter": splitting.SPLITTER}


def _embed(documents: list[_Document], encoder, settings: dict, reusable: dict,
           batch_size: int, backend: str, progress) -> Index:
    """Split and embed the documents whose key `reusable` lacks; reuse the others' passages
    and vectors (renamed to the document's name)."""
    fresh: dict[tuple, list[Passage]] = {}
    for doc in documents:
        if doc.key not in reusable and doc.key not in fresh:
            fresh[doc.key] = split_text(doc.text, kind_of(doc.name), file=doc.name,
                                        count_tokens=getattr(encoder, "count_tokens", None),
                                        max_tokens=settings["max_tokens"],
                                        overlap=settings["overlap"])
    new = [p for passages in fresh.values() for p in passages]
    if progress is not None:
        progress(0, len(new))
    vectors = torch.empty(0, encoder.dim)
    if new:
        ids = encoder.tokenize([p.embed_text for p in new])
        report = None if progress is None else (lambda done: progress(done, len(new)))
        vectors = encoder.encode_ids(ids, batch_size=batch_size, backend=backend,
                                     progress=report).float().cpu()
    offset = 0
    for key, passages in fresh.items():
        reusable[key] = (passages, vectors[offset:offset + len(passages)])
        offset += len(passages)
    rows, all_passages, all_vectors = [], [], []
    for doc in documents:
        passages, vecs = reusable[doc.key]
        rows.append({"path": doc.name, "sha256": doc.sha256, "bytes": doc.bytes,
                     "first": len(all_passages), "count": len(passages)})
        all_passages += [p if p.file == doc.name else dataclasses.replace(p, file=doc.name)
                         for p in passages]
        all_vectors.append(vecs)
    report = BuildReport([d.name for d in documents if d.key in fresh],
                         [d.name for d in documents if d.key not in fresh], [], len(new))
    matrix = torch.cat(all_vectors) if all_vectors else torch.empty(0, encoder.dim)
    return Index(all_passages, matrix.contiguous(), model_identity(encoder), dict(settings), rows,
                 encoder=encoder, report=report)


def _display_name(path: Path) -> str:
    """`path` relative to the current directory when it lies under it, else absolute."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return absolute.as_posix()


def collect_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The files to index: each file named, whatever its suffix, and the files under each
    folder (recursively, sorted by path) whose suffix is in KINDS, hidden ones left out; each
    file once (a str or path alone is one path)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found, seen = [], set()
    for given in paths:
        path = Path(given)
        if path.is_dir():
            walked = []
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                walked += [Path(root) / n for n in names
                           if not n.startswith(".") and Path(n).suffix.lower() in KINDS]
            walked.sort()  # by path parts: "a.md", "sub/b.md", "z.md"
        elif path.is_file():
            walked = [path]
        else:
            raise ValueError(f"paths: {given} does not exist" if not path.exists() else
                             f"paths: {given} is neither a file nor a folder")
        for file in walked:
            if (real := os.path.realpath(file)) not in seen:
                seen.add(real)
                found.append(file)
    return found


def _why_skip(data: bytes) -> str | None:
    if not data.strip():
        return "it is empty" if not data else "it holds only whitespace"
    if b"\x00" in data:
        return "it is binary (it holds NUL bytes)"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"it is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})"
    return None


def build_index(paths: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, *,
                encoder=None, max_tokens: int = 200, overlap: int = 32, batch_size: int = 32,
                backend: str = "auto",
                progress: Callable[[int, int], None] | None = None) -> Index:
    """Index the text, Markdown and Python files in `paths` (see collect_files), and write the
    index to the folder `out` when given.

    Each file is split into passages (`split_text`, budget `max_tokens` tokens, `overlap`) and
    each passage embedded by `encoder` (default: the shipped all-MiniLM-L6-v2) in batches of
    `batch_size`; `progress(done, total)` follows the passages embedded. An empty, binary or
    non-UTF-8 file is skipped with a warning naming it. When `out` already holds an index made
    with the same model and settings, the vectors of files whose content is unchanged are reused
    and the index is replaced crash-safely; files not in `paths` drop out of it. Raises
    ValueError for a missing path, nothing left to index, or an `out` that is a file or a
    non-empty folder without an index in it.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    encoder = default_encoder() if encoder is None else encoder
    _check_settings(max_tokens, overlap, batch_size, encoder)
    settings = _settings(max_tokens, overlap)
    out = None if out is None else Path(out)
    if out is not None:
        _check_out(out)
    documents, skipped = [], []
    for path in collect_files(paths):
        data = path.read_bytes()
        name = _display_name(path)
        if (why := _why_skip(data)) is not None:
            warnings.warn(f"skipped {name}: {why}", stacklevel=2)
            skipped.append(name)
            continue
        documents.append(_Document(name, data.decode("utf-8"), hashlib.sha256(data).hexdigest(),
                                   len(data)))
    if not documents:
        raise ValueError(f"nothing to index in {', '.join(map(str, paths))}: no text, Markdown "
                         f"or Python file{' left after skipping' if skipped else ''}")
    reusable = _reusable(out, encoder, settings) if out is not None else {}
    index = _embed(documents, encoder, settings, reusable, batch_size, backend, progress)
    index.report.skipped.extend(skipped)
    if out is not None:
        save_index(index, out)
    return index


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} is a file; give a folder for the index")
    if out.is_dir() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise ValueError(f"out: {out} is a folder that holds no index but other files; give a "
                         "new or empty folder")


def _reusable(out: Path, encoder, settings: dict) -> dict:
    """(sha256, kind) -> (passages, vectors) of the files in the index at `out`, if it was
    made with the same model and settings; {} if there is none. A corrupt one warns."""
    if not (out / MANIFEST).exists():
        return {}
    try:
        old = load_index(out)
    except IndexFormatError as e:
        warnings.warn(f"the index in {out} cannot be reused, so every file is embedded again: "
                      f"{e}", stacklevel=3)
        return {}
    if not same_model(old.model, model_identity(encoder)) or old.settings != settings:
        return {}
    reusable = {}
    for row in old.files:
        first, count = row["first"], row["count"]
        reusable[(row["sha256"], kind_of(row["path"]))] = (old.passages[first:first + count],
                                                            old.vectors[first:first + count])
    return reusable
