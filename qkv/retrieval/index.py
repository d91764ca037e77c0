"""A passage index: documents split into passages, each embedded by a sentence encoder, searched
by exact cosine similarity.

    index = build_index(["docs/", "notes.md"], "my-index")   # embed, write crash-safely
    index = load_index("my-index")                           # checksums and shapes checked
    hits = index.search("how do I install it?", k=5)         # passages and best sentences

On disk an index is one folder:

- `manifest.json`: format "qkv-index", version, the model's identity (name, sha256 of its
  weights, dim, max_length), the settings (max_tokens, overlap, the splitting rules' version),
  one row per file (path, sha256, bytes, and the passages `first` to `first + count` that came
  from it), and the name, size and sha256 of each data file;
- `vectors-<hash>.safetensors`: the (N, dim) float32 unit vectors, tensor "vectors";
- `passages-<hash>.json`: the N passages with their spans, `{"passages": [Passage.to_dict()]}`.

Data files are named after their content, so a new write never overwrites a file the current
manifest names. Each is written to a temporary name, fsynced and renamed; the manifest is written
last, the same way, and is the commit point; only then are data files no manifest names removed.
A crash at any step leaves the previous index whole (or the new one). One writer at a time.

Building (`build_index`, `index_texts`) lives in qkv.retrieval.build; both names are also
reachable from here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qkv.io import atomic_path, atomic_write_text, sha256_file
from qkv.retrieval.passages import Passage
from qkv.retrieval.search import Hit, hits_with_sentences

FORMAT, VERSION = "qkv-index", 1
MANIFEST = "manifest.json"
_DATA = re.compile(r"(vectors-[0-9a-f]{16}\.safetensors|passages-[0-9a-f]{16}\.json)")
_LEFTOVER = re.compile(r"\.(vectors-|passages-|manifest\.json).*\.tmp")  # a killed write's
_QUERY_BLOCK = 256  # queries scored at a time: (256, N) float32 scores in memory


class IndexFormatError(ValueError):
    """A missing, corrupt or mismatched index; the message names the folder, what is wrong and
    what to do."""


class QueryTruncatedWarning(UserWarning):
    """A query had more tokens than the model takes; only the first max_length were used."""


@dataclass
class BuildReport:
    """What a build did: files embedded anew, files whose vectors were reused, files skipped
    (empty or binary), and the number of passages embedded."""

    embedded: list[str]
    reused: list[str]
    skipped: list[str]
    passages_embedded: int


@dataclass(eq=False)
class Index:
    """Passages and their unit vectors (row i embeds passages[i]), with the model and settings
    that made them. `files` rows say which passages came from which file. `encoder` (None: the
    shipped all-MiniLM-L6-v2, loaded on first search and checked against `model`) embeds
    queries."""

    passages: list[Passage]
    vectors: torch.Tensor  # (N, dim) float32, unit rows, CPU
    model: dict
    settings: dict
    files: list[dict]
    folder: Path | None = None
    encoder: object = field(default=None, repr=False)
    report: BuildReport | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.passages)

    def query_encoder(self):
        """The encoder for queries; the default one is loaded and checked on first use."""
        if self.encoder is None:
            encoder = default_encoder()
            check_model(self, encoder)
            self.encoder = encoder
        return self.encoder

    def embed_queries(self, queries: Sequence[str], *, batch_size: int = 32,
                      backend: str = "auto") -> torch.Tensor:
        """(Q, dim) float32 unit vectors on the CPU; each query longer than the model's
        max_length warns QueryTruncatedWarning and is cut to it."""
        queries = _check_queries(queries)
        encoder = self.query_encoder()
        limit = encoder.max_length
        for i, count in enumerate(encoder.count_tokens(queries)):
            if count + 2 > limit:
                warnings.warn(
                    f"query {i + 1} of {len(queries)} has {count + 2} tokens ([CLS] and [SEP] "
                    f"included), more than the model's {limit}: only its first {limit} tokens "
                    f"were kept ({queries[i][:40]!r}...)", QueryTruncatedWarning, stacklevel=3)
        ids = encoder.tokenize(queries)
        return encoder.encode_ids(ids, batch_size=batch_size, backend=backend).float().cpu()

    def rank(self, queries: Sequence[str], k: int = 10, *, batch_size: int = 32,
             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """Exact cosine top-k: (Q, k') scores, best first, and (Q, k') passage indices, where
        k' = min(k, len(self)). Queries are embedded in batches of `batch_size`."""
        scores, ids, _ = self._rank(queries, k, batch_size, backend)
        return scores, ids

    def _rank(self, queries, k, batch_size, backend):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        q = self.embed_queries(queries, batch_size=batch_size, backend=backend)  # (Q, dim)
        k = min(k, len(self.passages))
        scores = torch.empty(len(q), k)
        ids = torch.empty(len(q), k, dtype=torch.long)
        for s in range(0, len(q), _QUERY_BLOCK):
            sim = q[s:s + _QUERY_BLOCK] @ self.vectors.T  # (b, N)
            scores[s:s + _QUERY_BLOCK], ids[s:s + _QUERY_BLOCK] = sim.topk(k, dim=1)
        return scores, ids, q

    def search_many(self, queries: Sequence[str], k: int = 10, *, batch_size: int = 32,
                    backend: str = "auto") -> list[list[Hit]]:
        """The top-k hits of each query, with the best-matching sentence of each passage."""
        scores, ids, q = self._rank(queries, k, batch_size, backend)
        return hits_with_sentences(self.query_encoder(), self.passages, q, scores, ids,
                                   batch_size=batch_size, backend=backend)

    def search(self, query: str, k: int = 5, *, batch_size: int = 32,
               backend: str = "auto") -> list[Hit]:
        """The top-k hits of one query (see search_many)."""
        if not isinstance(query, str):
            raise ValueError(f"query must be a str, got {type(query).__name__}")
        return self.search_many([query], k, batch_size=batch_size, backend=backend)[0]


def _check_queries(queries) -> list[str]:
    if isinstance(queries, str):
        raise ValueError("queries must be a sequence of str, got one str; use search(query) or "
                         "rank([query])")
    queries = list(queries)
    for i, query in enumerate(queries):
        if not isinstance(query, str):
            raise ValueError(f"queries[{i}] must be a str, got {type(query).__name__}")
    return queries


def default_encoder():
    """The shipped all-MiniLM-L6-v2 on the default device (loaded once, kept)."""
    from qkv.device import resolve_device
    from qkv.interop.minilm import _shipped

    return _shipped(resolve_device(None))


def model_identity(encoder) -> dict:
    return {key: encoder.identity[key] for key in ("name", "sha256", "dim", "max_length")}


def same_model(a: dict, b: dict) -> bool:
    """Whether two model identities make the same vectors (the name is only a label)."""
    return all(a.get(key) == b.get(key) for key in ("sha256", "dim", "max_length"))


def check_model(index: Index, encoder) -> None:
    """Raise IndexFormatError unless `encoder` is the model the index was built with."""
    have, want = model_identity(encoder), index.model
    if not same_model(have, want):
        def show(m):
            return (f"{m.get('name') or 'a model'} (weights sha256 {str(m.get('sha256'))[:12]}..., "
                    f"dim {m.get('dim')}, max_length {m.get('max_length')})")
        where = index.folder if index.folder is not None else "the index"
        raise IndexFormatError(f"{where} was built with {show(want)}, but the encoder is "
                               f"{show(have)}: build the index again with this model, or search "
                               "it with the model it was built with")


# -- on disk ----------------------------------------------------------------------------------

def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def save_index(index: Index, folder: str | os.PathLike) -> None:
    """Write `index` to `folder` crash-safely (see the module's docstring); sets index.folder."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    blobs = {
        "vectors": (save({"vectors": index.vectors.float().contiguous()}), ".safetensors"),
        "passages": (json.dumps({"passages": [p.to_dict() for p in index.passages]},
                                ensure_ascii=False).encode("utf-8"), ".json"),
    }
    data = {}
    for role, (blob, suffix) in blobs.items():
        digest = hashlib.sha256(blob).hexdigest()
        path = folder / f"{role}-{digest[:16]}{suffix}"
        if not (path.is_file() and sha256_file(path) == digest):
            _write_bytes(path, blob)
        data[role] = {"path": path.name, "sha256": digest, "bytes": len(blob)}
    manifest = {"format": FORMAT, "version": VERSION, "model": index.model,
                "settings": index.settings, "count": len(index.passages),
                "files": index.files, "data": data}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    keep = {entry["path"] for entry in data.values()}
    for path in sorted(folder.iterdir()):
        if (_DATA.fullmatch(path.name) and path.name not in keep) or \
                _LEFTOVER.fullmatch(path.name):
            _remove(path)
    index.folder = folder


def _corrupt(folder: Path, what: str) -> IndexFormatError:
    return IndexFormatError(f"{folder} is a corrupt index: {what}; build it again with "
                            f"`qkv index PATH... --out {folder}`")


def load_index(folder: str | os.PathLike, *, encoder=None) -> Index:
    """The index in `folder`, with every data file's size and sha256 checked against the
    manifest and every shape against the model. With `encoder`, also checks that it is the
    model the index was built with, and searches with it. Raises IndexFormatError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IndexFormatError(f"no index at {folder}: " + (
            "it is a file, not an index folder" if folder.exists() else "no such folder") +
            f"; build one with `qkv index PATH... --out {folder}`")
    if not (folder / MANIFEST).is_file():
        raise IndexFormatError(f"{folder} is not an index: it has no {MANIFEST}; build one with "
                               f"`qkv index PATH... --out {folder}`")
    try:
        manifest = json.loads((folder / MANIFEST).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(folder, f"{MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{folder} is not a qkv index: {MANIFEST} does not say format "
                               f"{FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise IndexFormatError(f"{folder} is an index of format version "
                               f"{manifest.get('version')!r}; this qkv reads version {VERSION}: "
                               "build it again with this qkv")
    try:
        index = _read(folder, manifest)
    except IndexFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise _corrupt(folder, f"{type(e).__name__}: {e}") from None
    if encoder is not None:
        check_model(index, encoder)
        index.encoder = encoder
    return index


def _read_data(folder: Path, entry: dict) -> bytes:
    path = folder / entry["path"]
    if Path(entry["path"]).name != entry["path"] or not path.is_file():
        raise _corrupt(folder, f"the data file {entry['path']} is missing")
    blob = path.read_bytes()
    if len(blob) != entry["bytes"] or hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        raise _corrupt(folder, f"checksum mismatch: {entry['path']} is not the file the "
                       "manifest names (changed or truncated)")
    return blob


def _read(folder: Path, manifest: dict) -> Index:
    from safetensors import SafetensorError
    from safetensors.torch import load

    model, settings, files = manifest["model"], manifest["settings"], manifest["files"]
    data = manifest["data"]
    try:
        tensors = load(_read_data(folder, data["vectors"]))
    except SafetensorError as e:
        raise _corrupt(folder, f"the vectors file cannot be read ({e})") from None
    if "vectors" not in tensors:
        raise _corrupt(folder, "the vectors file holds no tensor 'vectors'")
    vectors = tensors["vectors"]
    records = json.loads(_read_data(folder, data["passages"]).decode("utf-8"))["passages"]
    passages = [Passage.from_dict(r) for r in records]
    shape = (manifest["count"], model["dim"])
    if vectors.dtype != torch.float32 or tuple(vectors.shape) != shape or len(passages) != shape[0]:
        raise _corrupt(folder, f"shape mismatch: {len(passages)} passages and vectors of "
                       f"{tuple(vectors.shape)} {vectors.dtype}; the manifest says {shape} "
                       "float32")
    first = 0
    for row in files:
        if row["first"] != first or any(p.file != row["path"]
                                        for p in passages[first:first + row["count"]]):
            raise _corrupt(folder, f"the files rows do not match the passages at {row['path']}")
        first += row["count"]
    if first != len(passages):
        raise _corrupt(folder, f"the files rows cover {first} of {len(passages)} passages")
    return Index(passages, vectors, model, settings, files, folder=folder)


def __getattr__(name: str):
    if name in ("build_index", "index_texts", "collect_files"):
        from qkv.retrieval import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
