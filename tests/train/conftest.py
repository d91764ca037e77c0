"""A tiny training setup shared by the training tests: a slice of the stdlib corpus, the byte
tokenizer, and a one-layer model that trains in a fraction of a second per step."""

import pytest

from qkv.train import TrainConfig, prepare_data

TINY = {
    "corpus": "stdlib", "max_bytes": 120_000, "tokenizer": "byte", "seq_len": 32,
    "model": {"d_model": 32, "n_layers": 1, "n_heads": 2},
    "batch_size": 4, "max_steps": 6, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
    "eval_interval": 100, "eval_batches": 2, "log_interval": 1, "checkpoint_interval": 100,
    "keep_checkpoints": 3, "threads": 1, "progress": False, "device": "cpu",
}


def tiny_config(out_dir, **overrides) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, "out_dir": str(out_dir), **overrides})


@pytest.fixture(scope="session")
def tiny_data():
    """The tiny corpus, tokenized once for the whole session."""
    return prepare_data(TrainConfig.from_dict({**TINY, "out_dir": "unused"}))
