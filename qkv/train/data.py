"""A training run's data: corpus, tokenizer, token streams per split, and the batch stream.

Text trains on windows of seq_len tokens over each split's token stream. A protein corpus
(qkv.data.proteins) trains on whole sequences instead, [eos, residues.., eos] each, batched by
length (`Sequences`); its validation and test splits are read as windows over the stream, as for
text, and qkv.data.bits_per_residue scores whole sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qkv.data import (
    SPLITS,
    Corpus,
    CorpusError,
    LengthBucketSampler,
    LMWindows,
    ShardedSampler,
    Tokenizer,
    byte_tokenizer,
    is_protein_source,
    residue_tokenizer,
    sequence_examples,
    token_stream,
    train_bpe,
)
from qkv.data.proteins import pad_examples
from qkv.train.config import TrainConfig


def load_corpus(config: TrainConfig) -> Corpus:
    """The corpus `config` names. Raises FileNotFoundError (missing) or CorpusError (empty,
    not text)."""
    options = {"max_bytes": config.max_bytes, "max_files": config.max_files,
               "text_key": config.text_key, "split": config.split,
               "fractions": config.split_fractions}
    if config.suffixes is not None:
        options["suffixes"] = config.suffixes
    corpus = Corpus.load(config.corpus, **options)
    if not corpus.train:
        raise CorpusError(f"corpus {config.corpus!r} has no documents in the training split "
                          f"(split {corpus.describe_split()}); {_split_advice(corpus)}")
    return corpus


def _split_advice(corpus: Corpus) -> str:
    """What to change when a split of `corpus` is too small."""
    if corpus.split == "document":
        return ("add documents, or set split = \"position\" to cut every document into "
                "train / validation / test parts")
    return "add text, or give that split a larger share of split_fractions"


def build_tokenizer(config: TrainConfig, corpus: Corpus) -> Tokenizer:
    """A BPE tokenizer trained on the training split, the byte tokenizer, or the residue
    tokenizer."""
    if config.tokenizer == "byte":
        return byte_tokenizer()
    if config.tokenizer == "residue":
        return residue_tokenizer()
    return train_bpe(corpus.texts("train"), vocab_size=config.vocab_size)


def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """(V,) long: the UTF-8 bytes of text each token id stands for; 0 for special tokens."""
    return torch.tensor(tokenizer.byte_lengths(), dtype=torch.long)


class Sequences:
    """The training examples of a protein corpus: whole sequences (qkv.data.sequence_examples),
    batched by BatchStream with length bucketing, at most max_tokens padded tokens a batch."""

    def __init__(self, examples: list[np.ndarray], max_tokens: int, pad_id: int):
        self.examples, self.max_tokens, self.pad_id = examples, max_tokens, pad_id
        self.lengths = [len(e) - 1 for e in examples]  # inputs

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, L) padded with pad_id, y (B, L) with IGNORE_INDEX; L the longest input."""
        return pad_examples([self.examples[i] for i in indices], self.pad_id)


@dataclass
class TrainData:
    """Token streams of the three splits (each document followed by eos) and what they need;
    for a protein corpus also the training split's whole sequences (`sequences`)."""

    corpus: Corpus
    tokenizer: Tokenizer
    streams: dict[str, np.ndarray]
    token_bytes: torch.Tensor  # (V,)
    sequences: Sequences | None = None

    def windows(self, split: str, seq_len: int) -> LMWindows | Sequences:
        """Windows of seq_len tokens over the split's stream; for a protein corpus's training
        split, its whole sequences (Sequences), which BatchStream batches by length."""
        if split == "train" and self.sequences is not None:
            return self.sequences
        return LMWindows(self.streams[split], seq_len)

    def describe(self) -> str:
        parts = [f"{s}: {len(self.corpus[s])} files, {len(self.streams[s]):,} tokens"
                 for s in SPLITS]
        text = "; ".join(parts) + f" (split {self.corpus.describe_split()})"
        if self.sequences is not None:
            cut = len(self.sequences) - len(self.corpus.train)
            text += (f"; {self.corpus.summary}; training on whole sequences bucketed by length"
                     f" ({cut:,} longer than seq_len cut into pieces)")
        return text


def prepare_data(config: TrainConfig, *, corpus: Corpus | None = None,
                 tokenizer: Tokenizer | None = None) -> TrainData:
    """Load the corpus and tokenize every split (training a tokenizer unless one is given).

    Raises CorpusError if the training split cannot fill one batch or the validation split
    cannot fill one window.
    """
    corpus = corpus if corpus is not None else load_corpus(config)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(config, corpus)
    streams = {s: token_stream(tokenizer.encode_batch(corpus.texts(s)), tokenizer.eos_id)
               for s in SPLITS}
    data = TrainData(corpus, tokenizer, streams, token_byte_lengths(tokenizer))
    need = config.seq_len + 1
    if is_protein_source(config.corpus):
        examples = sequence_examples(tokenizer.encode_batch(corpus.texts("train")),
                                     tokenizer.eos_id, config.seq_len)
        max_tokens = config.max_tokens or config.batch_size * config.seq_len
        data.sequences = Sequences(examples, max_tokens, tokenizer.pad_id)
    elif len(streams["train"]) < need * config.batch_size:
        raise CorpusError(f"corpus {config.corpus!r}: the training split has "
                          f"{len(streams['train'])} tokens, fewer than one batch of "
                          f"{config.batch_size} x {need}; add text or lower batch_size/seq_len")
    n_valid = len(streams["validation"])
    if n_valid < need:
        shorter = f", or lower seq_len to {n_valid - 1}" if n_valid > 2 else ""
        raise CorpusError(f"corpus {config.corpus!r}: the validation split has {n_valid} tokens, "
                          f"fewer than one window of {need} (split {corpus.describe_split()}); "
                          f"{_split_advice(corpus)}{shorter}")
    return data


class BatchStream:
    """Micro-batches (x, y) of training windows for one rank, in a fixed order per seed.

    Each epoch all ranks share the permutation (seed, epoch) of the windows, and rank r reads
    every world_size-th of it (qkv.data.ShardedSampler, drop_last). A micro-batch is the next
    batch_size indices of the rank's share; a share's remainder shorter than a batch is skipped
    and the next epoch begins. So the k-th optimizer step sees the same set of windows for any
    split of its global batch into ranks and accumulation steps. `state()` is the position.

    Sequences (a protein corpus) are batched by length instead: each epoch all ranks cut the same
    batches (qkv.data.LengthBucketSampler with batch_size and Sequences.max_tokens, seed, epoch),
    rank r takes every world_size-th, all ranks as many, and a micro-batch is the next of them.
    """

    def __init__(self, windows: LMWindows | Sequences, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        self.windows, self.batch_size = windows, batch_size
        self.rank, self.world_size = rank, world_size
        self.epoch, self.offset = 0, 0
        self._order: list | None = None
        if isinstance(windows, Sequences):
            self.sampler = LengthBucketSampler(windows.lengths, batch_size=batch_size,
                                               max_tokens=windows.max_tokens, seed=seed)
            if len(self.sampler) < world_size:
                raise CorpusError(f"{len(windows)} training sequences make "
                                  f"{len(self.sampler)} batches, fewer than one for each of "
                                  f"{world_size} process(es); add sequences or lower "
                                  f"batch_size/max_tokens")
            return
        self.sampler = ShardedSampler(len(windows), rank, world_size, seed=seed, drop_last=True)
        if len(self.sampler) < batch_size:
            raise CorpusError(f"{len(windows)} training windows give each of {world_size} "
                              f"process(es) {len(self.sampler)}, fewer than batch_size "
                              f"{batch_size}; add text or lower batch_size/seq_len")

    def _epoch_order(self) -> list:
        if self._order is None:
            self.sampler.set_epoch(self.epoch)
            if isinstance(self.sampler, LengthBucketSampler):
                batches = self.sampler.batches()
                per_rank = len(batches) // self.world_size
                self._order = batches[self.rank::self.world_size][:per_rank]
            else:
                self._order = list(self.sampler)
        return self._order

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch: x, y (batch_size, seq_len) long; for Sequences (B, L) with B
        and L those of the batch, padding in y set to IGNORE_INDEX."""
        if isinstance(self.windows, Sequences):
            if self.offset >= len(self._epoch_order()):
                self.epoch, self.offset, self._order = self.epoch + 1, 0, None
            batch = self._epoch_order()[self.offset]
            self.offset += 1
            return self.windows.batch(batch)
        if self.offset + self.batch_size > len(self._epoch_order()):
            self.epoch, self.offset, self._order = self.epoch + 1, 0, None
        idx = self._epoch_order()[self.offset:self.offset + self.batch_size]
        self.offset += self.batch_size
        xs, ys = zip(*(self.windows[i] for i in idx), strict=True)
        return torch.stack(xs), torch.stack(ys)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.offset, self._order = int(state["epoch"]), int(state["offset"]), None
