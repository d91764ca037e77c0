"""Training a DecoderLM on a protein corpus: residue tokenizer, whole sequences bucketed by
length, resumable batch order, checkpoints that load the residue tokenizer back."""

import numpy as np
import pytest
import torch

from qkv.data import IGNORE_INDEX, ResidueTokenizer
from qkv.train import BatchStream, TrainConfig, prepare_data, train
from qkv.train.checkpoint import load_model
from qkv.train.config import count_params
from qkv.train.data import Sequences
from tests.train.conftest import TINY


def write_fasta(path, n=150, seed=0):
    """n sequences of 5 to 150 residues drawn from a skewed alphabet (learnable)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("MKVLLAAAGGEEST"))
    with open(path, "w") as f:
        for i in range(n):
            length = int(rng.integers(5, 150))
            seq = "".join(rng.choice(letters, size=length))
            f.write(f">prot{i} made up\n{seq[:60]}\n{seq[60:]}*\n".replace("\n*", "*"))
    return path


@pytest.fixture(scope="module")
def fasta(tmp_path_factory):
    return write_fasta(tmp_path_factory.mktemp("fasta") / "toy.faa")


def protein_config(fasta, out_dir="unused", **overrides):
    values = {**TINY, "corpus": str(fasta), "tokenizer": "bpe", "seq_len": 64, "max_tokens": 256,
              "out_dir": str(out_dir), **overrides}
    return TrainConfig.from_dict(values)


def test_config_picks_the_residue_tokenizer(fasta):
    config = protein_config(fasta)
    assert config.tokenizer == "residue" and config.to_dict()["max_tokens"] == 256
    assert count_params(config) < count_params(protein_config(fasta, tokenizer="byte"))
    with pytest.raises(ValueError, match="tokenizer 'residue' is for protein corpora"):
        TrainConfig(tokenizer="residue")
    with pytest.raises(ValueError, match="'position' would cut every sequence apart"):
        protein_config(fasta, split="position")


def test_data_is_whole_sequences_bucketed_by_length(fasta):
    config = protein_config(fasta)
    data = prepare_data(config)
    assert isinstance(data.tokenizer, ResidueTokenizer)
    sequences = data.windows("train", config.seq_len)
    assert isinstance(sequences, Sequences)
    residues = sum(len(t) for t in data.corpus.texts("train"))
    # Each sequence is [eos, residues.., eos]; pieces of a long one overlap by one token.
    assert sum(sequences.lengths) == residues + len(data.corpus.train)
    assert max(sequences.lengths) <= config.seq_len
    assert "150 sequences" in data.describe() and "bucketed by length" in data.describe()
    stream = BatchStream(sequences, config.batch_size, seed=0)
    shapes = set()
    for _ in range(12):
        x, y = stream.next()
        assert x.shape == y.shape and x.numel() <= 256 and x.shape[0] <= config.batch_size
        pad = y == IGNORE_INDEX
        assert torch.all(x[pad] == data.tokenizer.pad_id)
        shapes.add(tuple(x.shape))
    assert len(shapes) > 3  # batches differ in length


def test_stream_resumes_at_the_same_batch(fasta):
    config = protein_config(fasta)
    sequences = prepare_data(config).windows("train", config.seq_len)
    a = BatchStream(sequences, 4, seed=3)
    for _ in range(40):  # past an epoch boundary
        a.next()
    b = BatchStream(sequences, 4, seed=3)
    b.load_state(a.state())
    for _ in range(3):
        xa, _ = a.next()
        xb, _ = b.next()
        assert torch.equal(xa, xb)
    ranks = [BatchStream(sequences, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    assert len(ranks[0]._epoch_order()) == len(ranks[1]._epoch_order())


def test_stream_bits_per_byte_is_bits_per_residue(fasta):
    data = prepare_data(protein_config(fasta))
    for split in ("validation", "test"):
        stream = torch.from_numpy(data.streams[split])
        residues = sum(len(t) for t in data.corpus.texts(split))
        assert int(data.token_bytes[stream].sum()) == residues


def test_train_and_load_the_checkpoint(fasta, tmp_path):
    config = protein_config(fasta, tmp_path / "run", max_steps=8, lr=1e-2, eval_interval=8)
    result = train(config)
    assert result.losses[8] < result.losses[1]
    model, tokenizer, _ = load_model(result.checkpoint)
    assert isinstance(tokenizer, ResidueTokenizer) and model.config.vocab_size == 29


def test_tokens_in_the_metrics_are_the_scored_ones_not_the_padding(fasta, tmp_path):
    import json

    config = protein_config(fasta, tmp_path / "run", max_steps=6, log_interval=1,
                            eval_interval=100)
    train(config)
    stream = BatchStream(prepare_data(config).windows("train", config.seq_len),
                         config.batch_size, seed=config.seed)
    scored = [int((stream.next()[1] != IGNORE_INDEX).sum()) for _ in range(6)]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    tokens = [r["tokens"] for r in records if r["kind"] == "train"]
    assert tokens == list(np.cumsum(scored))
    assert tokens[-1] < 6 * config.max_tokens  # padded slots are not counted
