"""`qkv train` as a process: kill it with SIGKILL and resume it to the losses of a run never
stopped; interrupt it with Ctrl-C and get a checkpoint and the command to continue."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from qkv.train import list_checkpoints, train, verify
from tests.train import conftest
from tests.train.conftest import TINY, tiny_config

tiny_data = conftest.tiny_data  # the shared fixture

STEPS = 40


def _toml(values: dict) -> str:
    lines, model = [], values.pop("model")
    for key, value in values.items():
        lines.append(f"{key} = {json.dumps(value)}")
    lines.append("[model]")
    lines += [f"{k} = {json.dumps(v)}" for k, v in model.items()]
    return "\n".join(lines) + "\n"


def _train_losses(run_dir) -> dict[int, float]:
    losses = {}
    for line in (run_dir / "metrics.jsonl").open():
        record = json.loads(line)
        if record["kind"] == "train":
            assert record["step"] not in losses, "a step was logged twice"
            losses[record["step"]] = record["loss"]
    return losses


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, tiny_data):
    run = tmp_path / "killed"
    settings = {**TINY, "max_steps": STEPS, "checkpoint_interval": 5, "eval_interval": 10,
                "out_dir": str(run)}
    config = tmp_path / "run.toml"
    config.write_text(_toml(dict(settings)))
    cmd = [sys.executable, "-m", "qkv", "train", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list_checkpoints(run)) >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, (tmp_path / "first.log").read_text()
    killed_at = list_checkpoints(run)
    assert len(killed_at) >= 2 and killed_at[-1].name != f"step-{STEPS:08d}"

    # Damage the newest checkpoint: resume must say so and fall back to the one before.
    weights = killed_at[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    second = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert second.returncode == 0, second.stderr + second.stdout
    out = " ".join((second.stdout + second.stderr).split())
    assert f"falling back to {killed_at[-2].name}" in out
    assert f"resumed from {run}" in out

    reference = train(tiny_config(tmp_path / "straight", max_steps=STEPS, checkpoint_interval=5,
                                  eval_interval=10), data=tiny_data)
    resumed = _train_losses(run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step, loss in reference.losses.items():
        assert abs(resumed[step] - loss) <= 1e-6, (step, resumed[step], loss)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_continue(tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "run.toml"
    config.write_text(_toml({**TINY, "max_steps": 100_000, "out_dir": str(run)}))
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "qkv", "train", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    [saved] = list_checkpoints(run)
    step = int(saved.name.removeprefix("step-"))
    assert err.strip().splitlines()[-1] == (
        f"interrupted at step {step}; checkpoint saved to {saved}; continue with: qkv train "
        f"--out-dir {run} --resume")
    assert "Traceback" not in err
    verify(saved)
    assert max(_train_losses(run)) == step  # the log ends where the checkpoint is
