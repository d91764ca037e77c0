"""Two gloo processes on the CPU train exactly like one process with their combined batch."""

import json
import os

import numpy as np
import pytest
import torch.multiprocessing as mp

from qkv.train import train
from tests.train.conftest import tiny_config

MODEL = {"d_model": 32, "n_layers": 1, "n_heads": 2, "bias": False}
STEPS = 4


def _worker(rank: int, world_size: int, out_dir: str, init_file: str) -> None:
    config = tiny_config(out_dir, batch_size=2, max_steps=STEPS, model=MODEL,
                         checkpoint_interval=2)
    train(config, rank=rank, world_size=world_size, init_method=f"file://{init_file}")


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_data):
    ddp_dir = tmp_path / "ddp"
    mp.spawn(_worker, args=(2, str(ddp_dir), str(tmp_path / "rendezvous")), nprocs=2, join=True)
    single = train(tiny_config(tmp_path / "single", batch_size=4, max_steps=STEPS, model=MODEL),
                   data=tiny_data)
    records = [json.loads(line) for line in (ddp_dir / "metrics.jsonl").open()]
    losses = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    assert sorted(losses) == list(range(1, STEPS + 1))  # rank 0 alone logged, once per step
    for step, loss in single.losses.items():
        assert abs(losses[step] - loss) < 1e-5, (step, losses[step], loss)
    evals = [r for r in records if r["kind"] == "eval"]
    assert abs(evals[-1]["loss"] - single.eval["loss"]) < 1e-5
    names = sorted(p.name for p in (ddp_dir / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000004"]


def _resume_worker(rank: int, world_size: int, root: str) -> None:
    """Train run A straight through; then rank 0 copies A without its last checkpoint to B (as
    if killed after step 2) and both ranks resume B. Each rank saves its final torch RNG."""
    import shutil
    from pathlib import Path

    import numpy as np
    import torch

    root = Path(root)
    config = {"batch_size": 2, "max_steps": 4, "checkpoint_interval": 2,
              "model": {**MODEL, "dropout": 0.2, "attn_dropout": 0.2}}
    train(tiny_config(root / "A", **config), rank=rank, world_size=world_size,
          init_method=f"file://{root / 'rendezvous-a'}")
    np.save(root / f"A-rank{rank}.npy", torch.get_rng_state().numpy())
    if rank == 0:  # the others wait in the next rendezvous until this is done
        shutil.copytree(root / "A", root / "B")
        shutil.rmtree(root / "B" / "checkpoints" / "step-00000004")
    train(tiny_config(root / "B", **config), rank=rank, world_size=world_size,
          init_method=f"file://{root / 'rendezvous-b'}", resume=True)
    np.save(root / f"B-rank{rank}.npy", torch.get_rng_state().numpy())


@pytest.mark.slow
def test_resume_restores_every_ranks_generators(tmp_path):
    mp.spawn(_resume_worker, args=(2, str(tmp_path)), nprocs=2, join=True)

    def losses(run):
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").open()]
        return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}

    straight, resumed = losses("A"), losses("B")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):  # dropout on both ranks drew the masks of the uninterrupted run
        assert resumed[step] == straight[step], step
    for rank in (0, 1):
        assert np.array_equal(np.load(tmp_path / f"A-rank{rank}.npy"),
                              np.load(tmp_path / f"B-rank{rank}.npy")), rank


def _locked_out_worker(rank: int, world_size: int, root: str) -> None:
    from pathlib import Path

    from qkv.train import RunInUseError

    try:
        train(tiny_config(Path(root) / "run", batch_size=2, max_steps=2, model=MODEL),
              rank=rank, world_size=world_size, init_method=f"file://{root}/rendezvous")
    except RunInUseError as e:
        (Path(root) / f"error-rank{rank}.txt").write_text(str(e))


@pytest.mark.slow
def test_a_locked_run_folder_stops_every_rank_without_a_deadlock(tmp_path):
    from qkv.train.runfolder import RunLock

    (tmp_path / "run").mkdir()
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    try:
        mp.spawn(_locked_out_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    finally:
        lock.release()
    for rank in (0, 1):
        message = (tmp_path / f"error-rank{rank}.txt").read_text()
        assert f"in use by another qkv run (process {os.getpid()})" in message
