"""Two gloo processes on the CPU train exactly like one process with their combined batch."""

import json

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
