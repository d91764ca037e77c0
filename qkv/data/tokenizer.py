"""Byte-level tokenizers: BPE trained with HF `tokenizers`, and a plain byte fallback.

Both are one class, `Tokenizer`, over an HF `tokenizers.Tokenizer` with a byte-level
pre-tokenizer and decoder, and both save as a standard `tokenizer.json`:

- `byte_tokenizer()`: ids 0..255 are the bytes themselves (no merges), then the special tokens.
- `train_bpe(texts, vocab_size)`: the 256 bytes, the special tokens, and learned merges.

Conventions:
- No normalization and no added prefix space, so `decode(encode(text)) == text` for any text.
- Special tokens are never produced from text: a document that contains the string
  "<|endoftext|>" encodes it as ordinary bytes. Code inserts `eos_id` explicitly.
- `decode` renders special tokens as their strings unless `skip_special_tokens=True`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from qkv.io import atomic_write, write_errors

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOS, PAD)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, as the ByteLevel pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class Tokenizer:
    """Text <-> token ids. Wraps an HF byte-level tokenizer; build with `byte_tokenizer`,
    `train_bpe` or `Tokenizer.load`."""

    def __init__(self, hf: _HFTokenizer):
        hf.encode_special_tokens = True  # text never yields special ids; not kept in the file
        self.hf = hf
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.eos_id: int = hf.token_to_id(EOS)
        self.pad_id: int = hf.token_to_id(PAD)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts, in parallel."""
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; an incomplete UTF-8 sequence decodes to U+FFFD."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def byte_lengths(self) -> list[int]:
        """The number of UTF-8 bytes of text each token id stands for; 0 for special tokens.

        Byte-level tokens spell their bytes with one character per byte, so the length of the
        token's string is its byte count.
        """
        lengths = [0] * self.vocab_size
        for token, i in self.hf.get_vocab(with_added_tokens=False).items():
            if i not in (self.eos_id, self.pad_id):
                lengths[i] = len(token)
        return lengths

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json to `path` (a file, or a directory to hold tokenizer.json), through
        qkv.io.atomic_write: a reader never sees half a file, and a failed write leaves the old
        file as it was. A failed write raises OSError naming the file (errno ENOSPC for a full
        disk); the `tokenizers` library itself raises a plain Exception."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        with write_errors(path, (Exception,)):  # only the library's save runs inside
            atomic_write(path, lambda tmp: self.hf.save(str(tmp)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a tokenizer.json (or a directory holding one) written by `save`: a
        qkv.data.residues.ResidueTokenizer for the residue tokenizer's file, else a Tokenizer."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        hf = _HFTokenizer.from_file(str(path))
        from qkv.data.residues import ResidueTokenizer, is_residue_hf  # it builds on this module

        return ResidueTokenizer(hf) if is_residue_hf(hf) else cls(hf)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
                f"pad_id={self.pad_id})")


def _byte_level(hf: _HFTokenizer, use_regex: bool) -> _HFTokenizer:
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    hf.decoder = decoders.ByteLevel()
    return hf


def byte_tokenizer() -> Tokenizer:
    """The fallback tokenizer: id b is byte b (0..255), then <|endoftext|> 256 and <|pad|> 257."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    hf = _byte_level(_HFTokenizer(models.BPE(vocab=vocab, merges=[])), use_regex=False)
    hf.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(hf)


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE tokenizer trained on `texts` (the training split only).

    The vocabulary holds the special tokens (ids 0 and 1), the 256 bytes, and merges up to
    `vocab_size`; training is deterministic for the same texts in the same order.
    Raises ValueError if `vocab_size` cannot hold the bytes and special tokens.
    """
    smallest = 256 + len(SPECIAL_TOKENS)
    if vocab_size < smallest:
        raise ValueError(f"vocab_size must be at least {smallest} (bytes and special tokens), "
                         f"got {vocab_size}")
    hf = _byte_level(_HFTokenizer(models.BPE()), use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    hf.train_from_iterator(texts, trainer)
    return Tokenizer(hf)
