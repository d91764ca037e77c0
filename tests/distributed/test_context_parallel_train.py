"""Training with each sequence sharded across processes (context parallelism) gives the losses
of one process training on whole sequences with the same global batch."""

import json

import pytest
import torch.multiprocessing as mp

from qkv.train import TrainConfig, train
from tests.train.conftest import TINY, tiny_config

STEPS = 3


def _worker(rank: int, world_size: int, out_dir: str, init_file: str, settings: dict) -> None:
    train(tiny_config(out_dir, **settings), rank=rank, world_size=world_size,
          init_method=f"file://{init_file}")


def _compare(tmp_path, world_size: int, settings: dict, single_batch: int) -> None:
    run = tmp_path / "cp"
    mp.spawn(_worker, args=(world_size, str(run), str(tmp_path / "rendezvous"), settings),
             nprocs=world_size, join=True)
    alone = {**settings, "context_parallel": 1, "batch_size": single_batch}
    single = train(tiny_config(tmp_path / "single", **alone))
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    losses = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in single.losses.items():
        assert abs(losses[step] - loss) < 1e-5, (step, losses[step], loss)
    tokens = [r["tokens"] for r in records if r["kind"] == "train"]
    windows = STEPS * single_batch * settings.get("grad_accum", 1)
    assert tokens[-1] == windows * TINY["seq_len"]  # each window counted once
    evals = [r for r in records if r["kind"] == "eval"]
    assert abs(evals[-1]["loss"] - single.eval["loss"]) < 1e-5


def test_two_processes_sharing_each_sequence_train_like_one(tmp_path):
    settings = {"batch_size": 2, "max_steps": STEPS, "context_parallel": 2,
                "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "bias": False}}
    _compare(tmp_path, 2, settings, single_batch=2)


@pytest.mark.slow
def test_data_and_context_parallel_together_with_rope_gqa_checkpointing_accumulation(tmp_path):
    settings = {"batch_size": 2, "max_steps": STEPS, "context_parallel": 2, "grad_accum": 2,
                "activation_checkpointing": True,
                "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                          "positions": "rope", "bias": False}}
    _compare(tmp_path, 4, settings, single_batch=4)  # 2 data-parallel replicas of batch 2


def test_settings_context_parallelism_cannot_run_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"seq_len=30 must be divisible by 2 × "
                                         r"context_parallel = 4"):
        TrainConfig.from_dict({**TINY, "seq_len": 30, "context_parallel": 2})
    with pytest.raises(ValueError, match=r"does not offer model.positions \('alibi'\)"):
        TrainConfig.from_dict({**TINY, "context_parallel": 2,
                               "model": {**TINY["model"], "positions": "alibi"}})
    with pytest.raises(ValueError, match="context_parallel must be an int >= 1"):
        TrainConfig.from_dict({**TINY, "context_parallel": 0})
    with pytest.raises(ValueError, match=r"context_parallel=2 needs a number of processes that "
                                         r"it divides, got 1"):
        train(tiny_config(tmp_path / "run", context_parallel=2))
    assert not (tmp_path / "run").exists()
