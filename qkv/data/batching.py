"""Batches from token sequences: length bucketing, document packing, LM windows, sharding.

Two ways to batch sequences of different lengths:
- Bucketing (`LengthBucketSampler`): sequences of similar length share a batch, so little
  of each padded batch is padding. `padding_fraction` measures it.
- Packing (`pack_documents`): documents are laid end to end in fixed-length rows with no
  padding; `cu_seqlens` (for `qkv.attention_varlen`) or `document_mask` (for `qkv.attention`)
  keep every token inside its own document, and targets never cross a document boundary.

Targets use IGNORE_INDEX (-100, the default of `torch.nn.functional.cross_entropy`) wherever
there is nothing to predict.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qkv.nn.models import IGNORE_INDEX  # defined once, beside the loss that skips it

# ---------------------------------------------------------------- bucketing


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of a padded batch's slots that are padding, summed over `batches` (lists of indices
    into `lengths`); each batch is padded to its longest sequence."""
    lengths = np.asarray(lengths)
    real = padded = 0
    for batch in batches:
        ls = lengths[list(batch)]
        real += int(ls.sum())
        padded += int(ls.max()) * len(ls)
    return 1.0 - real / padded if padded else 0.0


def _cut(order: Sequence[int], lengths: np.ndarray, batch_size: int | None,
         max_tokens: int | None) -> list[list[int]]:
    """Cut `order` into consecutive batches of at most `batch_size` sequences and at most
    `max_tokens` padded tokens (len(batch) * longest). A sequence longer than `max_tokens` is a
    batch of its own."""
    batches, current, longest = [], [], 0
    for i in order:
        new_longest = max(longest, int(lengths[i]))
        full = (batch_size is not None and len(current) == batch_size) or (
            max_tokens is not None and new_longest * (len(current) + 1) > max_tokens)
        if current and full:
            batches.append(current)
            current, new_longest = [], int(lengths[i])
        current.append(int(i))
        longest = new_longest
    if current:
        batches.append(current)
    return batches


def random_batches(lengths: Sequence[int], *, batch_size: int | None = None,
                   max_tokens: int | None = None, seed: int = 0) -> list[list[int]]:
    """Batches of a plain shuffle, with the limits of `LengthBucketSampler` (for comparison)."""
    lengths = np.asarray(lengths)
    order = np.random.default_rng(seed).permutation(len(lengths))
    return _cut(order, lengths, batch_size, max_tokens)


class LengthBucketSampler(torch.utils.data.Sampler):
    """Yields batches (lists of indices) of sequences with similar lengths.

    Each epoch: shuffle all indices (seed, epoch), take them in pools of `pool_batches`
    batches' worth, sort each pool by length, cut it into batches of at most `batch_size`
    sequences and/or `max_tokens` padded tokens, then shuffle the batch order. The pools keep
    some randomness in which sequences meet; the sort keeps padding low.
    Use as `DataLoader(dataset, batch_sampler=sampler)`; call `set_epoch` before each epoch.
    """

    def __init__(self, lengths: Sequence[int], *, batch_size: int | None = None,
                 max_tokens: int | None = None, pool_batches: int = 100, seed: int = 0,
                 drop_last: bool = False):
        if batch_size is None and max_tokens is None:
            raise ValueError("LengthBucketSampler needs batch_size, max_tokens, or both")
        for name, value in (("batch_size", batch_size), ("max_tokens", max_tokens),
                            ("pool_batches", pool_batches)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.pool_batches, self.seed, self.drop_last = pool_batches, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _pool_size(self) -> int:
        if self.batch_size is not None:
            return self.batch_size * self.pool_batches
        mean = max(1.0, float(self.lengths.mean())) if len(self.lengths) else 1.0
        return max(1, int(self.max_tokens * self.pool_batches / mean))

    def batches(self) -> list[list[int]]:
        """This epoch's batches."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        pool = self._pool_size()
        batches = []
        for start in range(0, len(order), pool):
            chunk = order[start:start + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            cut = _cut(chunk, self.lengths, self.batch_size, self.max_tokens)
            if self.drop_last and self.batch_size is not None and len(cut[-1]) < self.batch_size:
                cut = cut[:-1]
            batches.extend(cut)
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor,
                                                                            torch.Tensor]:
    """(ids (B, L) long padded on the right with pad_id, lengths (B,) long), L the longest."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    ids = torch.full((len(sequences), int(lengths.max()) if len(sequences) else 0), pad_id,
                     dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return ids, lengths


# ---------------------------------------------------------------- packing


@dataclass
class PackedRows:
    """Documents packed end to end into R rows of L tokens.

    input_ids (R, L) long; targets (R, L) long, the next token of the same document or
    IGNORE_INDEX; doc_ids (R, L) long, the index of the document each token comes from (-1 for
    padding at the end); position_ids (R, L) long, each token's position within its piece of
    document in this row (restarting at every boundary and every row); cu_seqlens (S+1,) int32,
    offsets of the S pieces in the flattened (R*L) tokens, as `qkv.attention_varlen` takes them.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    doc_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor

    @property
    def max_seqlen(self) -> int:
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())

    def document_mask(self, causal: bool = True) -> torch.Tensor:
        """(R, 1, L, L) bool: query i may see key j of the same row and document (and j <= i)."""
        return document_mask(self.doc_ids, causal=causal)


def document_mask(doc_ids: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """(R, 1, L, L) bool block-diagonal mask from per-token document ids (R, L): True where
    query i and key j lie in the same document, and with `causal` also j <= i."""
    same = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]  # (R, 1, L, L)
    if causal:
        L = doc_ids.shape[-1]
        same = same & torch.ones(L, L, dtype=torch.bool, device=doc_ids.device).tril()
    return same


def pack_documents(documents: Sequence[Sequence[int]], seq_len: int, *, eos_id: int | None = None,
                   pad_id: int = 0, drop_last: bool = False) -> PackedRows:
    """Lay `documents` (token id lists) end to end and cut them into rows of `seq_len`.

    With `eos_id`, each document is followed by it, so the model learns to end documents.
    A document that runs past the end of a row continues at the start of the next one, as a new
    piece: no token sees another row. The last row is padded with `pad_id` (doc id -1,
    IGNORE_INDEX targets), or dropped with `drop_last`. The target of a token is the next token
    when both belong to the same document (across a row break too), else IGNORE_INDEX.
    Raises ValueError for a non-positive `seq_len` or no tokens.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    extra = [eos_id] if eos_id is not None else []
    pieces = [np.asarray([*d, *extra], dtype=np.int64) for d in documents]
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    docs = np.repeat(np.arange(len(pieces)), [len(p) for p in pieces])
    if len(tokens) == 0:
        raise ValueError("pack_documents got no tokens")
    targets = np.full_like(tokens, IGNORE_INDEX)
    same_next = docs[1:] == docs[:-1]
    targets[:-1][same_next] = tokens[1:][same_next]
    rows = len(tokens) // seq_len if drop_last else math.ceil(len(tokens) / seq_len)
    if rows == 0:
        raise ValueError(f"fewer tokens ({len(tokens)}) than one row of {seq_len} with drop_last")
    n = rows * seq_len
    pad = max(0, n - len(tokens))
    tokens = np.concatenate([tokens[:n], np.full(pad, pad_id)])
    targets = np.concatenate([targets[:n], np.full(pad, IGNORE_INDEX)])
    docs = np.concatenate([docs[:n], np.full(pad, -1)])
    # Pieces: a new one starts at every row start and every change of document.
    starts = np.ones(n, dtype=bool)
    starts[1:] = docs[1:] != docs[:-1]
    starts[::seq_len] = True
    start_idx = np.flatnonzero(starts)
    cu = np.append(start_idx, n).astype(np.int32)
    positions = np.arange(n) - np.repeat(start_idx, np.diff(cu))
    shape = (rows, seq_len)
    return PackedRows(
        input_ids=torch.from_numpy(tokens.reshape(shape)),
        targets=torch.from_numpy(targets.reshape(shape)),
        doc_ids=torch.from_numpy(docs.reshape(shape)),
        position_ids=torch.from_numpy(positions.reshape(shape)),
        cu_seqlens=torch.from_numpy(cu),
    )


# ---------------------------------------------------------------- LM windows and sharding


class LMWindows(torch.utils.data.Dataset):
    """(input, target) windows over one token stream: item i is
    tokens[i*stride : i*stride + seq_len] and the same shifted by one. stride defaults to seq_len
    (non-overlapping); only whole windows are kept. Deterministic; shuffle with a sampler."""

    def __init__(self, tokens: Sequence[int] | np.ndarray | torch.Tensor, seq_len: int,
                 stride: int | None = None):
        self.tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        self.seq_len, self.stride = seq_len, stride or seq_len
        if seq_len <= 0 or self.stride <= 0:
            raise ValueError(f"seq_len and stride must be positive, got {seq_len}, {stride}")
        self.n = max(0, (len(self.tokens) - 1 - seq_len) // self.stride + 1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.n <= i < self.n:
            raise IndexError(f"window {i} out of range for {self.n} windows")
        start = (i % self.n) * self.stride
        chunk = self.tokens[start:start + self.seq_len + 1]
        return chunk[:-1], chunk[1:]


def token_stream(documents: Sequence[Sequence[int]], eos_id: int) -> np.ndarray:
    """The documents' tokens end to end, each followed by `eos_id`, as int64."""
    pieces = [np.asarray([*d, eos_id], dtype=np.int64) for d in documents]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


class ShardedSampler(torch.utils.data.Sampler):
    """Indices 0..n-1 for one rank of `world_size`, for DistributedDataParallel.

    Each epoch all ranks draw the same permutation (seed, epoch) if `shuffle`, and rank r takes
    every world_size-th index from r. Every rank gets the same count. With drop_last=False the
    permutation is extended by wrapping around so the shards cover all n indices (up to
    world_size - 1 indices then appear twice); with drop_last=True the tail is dropped and the
    shards are disjoint.
    """

    def __init__(self, n: int, rank: int, world_size: int, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        self.n, self.rank, self.world_size = n, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        if drop_last:
            self.per_rank = n // world_size
        else:
            self.per_rank = math.ceil(n / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        else:
            order = np.arange(self.n)
        total = self.per_rank * self.world_size
        if total > self.n and self.n > 0:
            order = np.resize(order, total)  # wrap around
        return iter(order[:total][self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.per_rank
