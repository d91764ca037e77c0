"""The residue tokenizer: one token per amino acid letter, for protein sequences.

Vocabulary (29 ids, fixed, nothing is learned):
- 0 `<|endoftext|>` (eos; it also starts every sequence, as bos), 1 `<|pad|>`, 2 `<unk>`;
- 3..22 the 20 standard amino acids `ACDEFGHIKLMNPQRSTVWY`;
- 23..28 the other IUPAC letters, each a token of its own, kept as written (merging them would
  lose what the file says): `B` (D or N), `Z` (E or Q), `J` (I or L), `X` (any or unknown),
  `U` (selenocysteine) and `O` (pyrrolysine).

Rules:
- Lowercase letters are uppercased (`encode("mkv") == encode("MKV")`), so `decode(encode(s))` is
  `s.upper()` for any string of letters.
- Every other character (digits, `*`, `-`, spaces, ...) encodes as `<unk>`, one per character.
  A FASTA corpus never reaches that case: qkv.data.fasta refuses such characters with the file
  and line (a terminal `*` stop is removed there and counted). `<unk>` is for text typed by hand,
  such as a `qkv generate` prompt.
- Special tokens are never produced from text; `decode` renders them as their strings unless
  `skip_special_tokens=True`.
- Each residue and `<unk>` counts as one byte of text (`byte_lengths`), eos and pad as none, so
  the trainer's bits per byte on a protein corpus is bits per residue.

It is a qkv.data.Tokenizer over an HF `tokenizers` WordLevel model and saves as a standard
tokenizer.json; `Tokenizer.load` gives back a ResidueTokenizer for such a file.
"""

from __future__ import annotations

import string

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from qkv.data.tokenizer import EOS, PAD, Tokenizer

UNK = "<unk>"
STANDARD = "ACDEFGHIKLMNPQRSTVWY"
AMBIGUOUS = "BZJXUO"
RESIDUES = STANDARD + AMBIGUOUS  # all 26 capital letters
RESIDUE_SPECIALS = (EOS, PAD, UNK)
RESIDUE_VOCAB_SIZE = len(RESIDUE_SPECIALS) + len(RESIDUES)


class ResidueTokenizer(Tokenizer):
    """Protein sequences <-> token ids, one residue a token (see the module docstring)."""

    def __init__(self, hf: _HFTokenizer | None = None):
        super().__init__(_residue_hf() if hf is None else hf)
        self.unk_id: int = self.hf.token_to_id(UNK)

    def byte_lengths(self) -> list[int]:
        """1 for every residue and `<unk>` (one character each), 0 for eos and pad."""
        return [0 if i in (self.eos_id, self.pad_id) else 1 for i in range(self.vocab_size)]

    def __repr__(self) -> str:
        return (f"ResidueTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
                f"pad_id={self.pad_id}, unk_id={self.unk_id})")


def residue_tokenizer() -> ResidueTokenizer:
    """The residue tokenizer (29 ids)."""
    return ResidueTokenizer()


def is_residue_hf(hf: _HFTokenizer) -> bool:
    """Whether an HF tokenizer is the residue tokenizer (a WordLevel model over the residues)."""
    vocab = hf.get_vocab()
    return (isinstance(hf.model, models.WordLevel) and all(r in vocab for r in RESIDUES)
            and UNK in vocab)


def _residue_hf() -> _HFTokenizer:
    vocab = {token: i for i, token in enumerate((*RESIDUE_SPECIALS, *RESIDUES))}
    hf = _HFTokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    hf.normalizer = normalizers.Sequence([normalizers.Replace(lower, lower.upper())
                                          for lower in string.ascii_lowercase])
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens(list(RESIDUE_SPECIALS))
    return hf
