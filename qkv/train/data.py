"""A training run's data: corpus, tokenizer, token streams per split, and the batch stream."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qkv.data import (
    SPLITS,
    Corpus,
    CorpusError,
    LMWindows,
    ShardedSampler,
    Tokenizer,
    byte_tokenizer,
    token_stream,
    train_bpe,
)
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
    """A BPE tokenizer trained on the training split, or the byte tokenizer."""
    if config.tokenizer == "byte":
        return byte_tokenizer()
    return train_bpe(corpus.texts("train"), vocab_size=config.vocab_size)


def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """(V,) long: the UTF-8 bytes of text each token id stands for; 0 for special tokens."""
    return torch.tensor(tokenizer.byte_lengths(), dtype=torch.long)


@dataclass
class TrainData:
    """Token streams of the three splits (each document followed by eos) and what they need."""

    corpus: Corpus
    tokenizer: Tokenizer
    streams: dict[str, np.ndarray]
    token_bytes: torch.Tensor  # (V,)

    def windows(self, split: str, seq_len: int) -> LMWindows:
        return LMWindows(self.streams[split], seq_len)

    def describe(self) -> str:
        parts = [f"{s}: {len(self.corpus[s])} files, {len(self.streams[s]):,} tokens"
                 for s in SPLITS]
        return "; ".join(parts) + f" (split {self.corpus.describe_split()})"


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
    if len(streams["train"]) < need * config.batch_size:
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
    """

    def __init__(self, windows: LMWindows, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        self.windows, self.batch_size = windows, batch_size
        self.sampler = ShardedSampler(len(windows), rank, world_size, seed=seed, drop_last=True)
        if len(self.sampler) < batch_size:
            raise CorpusError(f"{len(windows)} training windows give each of {world_size} "
                              f"process(es) {len(self.sampler)}, fewer than batch_size "
                              f"{batch_size}; add text or lower batch_size/seq_len")
        self.epoch, self.offset = 0, 0
        self._order: list[int] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            self.sampler.set_epoch(self.epoch)
            self._order = list(self.sampler)
        return self._order

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch: x, y (batch_size, seq_len) long."""
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
