"""qkv.data: corpora (text, and protein FASTA), tokenizers (byte-level BPE, bytes, residues),
length bucketing, packing, the byte bigram baseline, and seeded synthetic tasks."""

from qkv.data.baseline import BigramModel, bits_per_byte, nats_to_bits_per_byte
from qkv.data.batching import (
    IGNORE_INDEX,
    LengthBucketSampler,
    LMWindows,
    PackedRows,
    ShardedSampler,
    document_mask,
    pack_documents,
    pad_sequences,
    padding_fraction,
    random_batches,
    token_stream,
)
from qkv.data.corpus import (
    SPLITS,
    Corpus,
    CorpusConfig,
    CorpusError,
    Document,
    split_of,
    stdlib_files,
    stdlib_root,
)
from qkv.data.fasta import FastaRecord, FastaSummary, is_fasta_path, parse_fasta, read_fasta
from qkv.data.proteins import (
    bits_per_residue,
    is_protein_source,
    ngram_bits_per_residue,
    padding_fractions,
    sequence_examples,
)
from qkv.data.residues import RESIDUES, ResidueTokenizer, residue_tokenizer
from qkv.data.tasks import (
    PlantedData,
    TaskData,
    copy_memory,
    induction,
    mqar,
    no_memory_loss,
    planted_keyword,
)
from qkv.data.tokenizer import EOS, PAD, Tokenizer, byte_tokenizer, train_bpe

__all__ = [
    "BigramModel", "bits_per_byte", "nats_to_bits_per_byte",
    "IGNORE_INDEX", "LengthBucketSampler", "LMWindows", "PackedRows", "ShardedSampler",
    "document_mask", "pack_documents", "pad_sequences", "padding_fraction", "random_batches",
    "token_stream",
    "SPLITS", "Corpus", "CorpusConfig", "CorpusError", "Document", "split_of", "stdlib_files",
    "stdlib_root",
    "PlantedData", "TaskData", "copy_memory", "induction", "mqar", "no_memory_loss",
    "planted_keyword",
    "EOS", "PAD", "Tokenizer", "byte_tokenizer", "train_bpe",
    "FastaRecord", "FastaSummary", "is_fasta_path", "parse_fasta", "read_fasta",
    "bits_per_residue", "is_protein_source", "ngram_bits_per_residue", "padding_fractions",
    "sequence_examples", "RESIDUES", "ResidueTokenizer", "residue_tokenizer",
]
