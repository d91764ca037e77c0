"""Who may remove a run folder, what Ctrl-C says at every moment, and the messages of a run
folder's failures: runs started together, failed demos, interrupts outside the step loop."""

import errno
import fcntl
import json
import os
import signal
import threading
import types

import pytest
import torch

from qkv.train import (
    CheckpointError,
    RunInUseError,
    distributed,
    list_checkpoints,
    runfolder,
    train,
)
from qkv.train import checkpoint as ckpt
from qkv.train import demo as demo_module
from qkv.train import steps as steps_module
from qkv.train.loop import Trainer
from qkv.train.steps import StepLoop
from tests.train.conftest import tiny_config

SINGLE = distributed.DistInfo()


def _run(run_dir, tiny_data, **overrides):
    resume = overrides.pop("resume", False)
    return train(tiny_config(run_dir, **overrides), data=tiny_data, resume=resume)


# ---------------------------------------------------------------- two runs, one new folder


def test_the_run_that_loses_the_race_for_a_new_folder_leaves_it_alone(tmp_path, monkeypatch):
    """Both runs get past the folder's creation before either locks it (a barrier forces the
    interleaving); the winner's folder and lock survive the loser's error."""
    run = tmp_path / "new"
    both_checked = threading.Barrier(2, timeout=10)
    real_probe = runfolder.probe_writable

    def probe_then_wait(folder):
        real_probe(folder)
        both_checked.wait()

    monkeypatch.setattr(runfolder, "probe_writable", probe_then_wait)
    loser_done = threading.Event()
    outcome = {}

    def start(name):
        try:
            with runfolder.claim(run, SINGLE):
                loser_done.wait(10)  # the winner holds the folder while the loser gives up
                outcome["winner_sees"] = sorted(os.listdir(run))
        except RunInUseError as e:
            outcome["loser"] = str(e)
            loser_done.set()

    threads = [threading.Thread(target=start, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert "in use by another qkv run" in outcome["loser"]
    assert outcome["winner_sees"] == [runfolder.LOCK_FILE]


def test_the_holders_pid_is_read_once_it_is_written(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / runfolder.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # locked, PID not written yet
    timer = threading.Timer(0.1, lambda: os.pwrite(fd, b"4242\n", 0))
    timer.start()
    try:
        with pytest.raises(RunInUseError, match=r"\(process 4242\)"):
            runfolder.RunLock(run).acquire()
    finally:
        timer.join()
        os.close(fd)


def test_a_lock_file_removed_while_waiting_for_it_is_not_held(tmp_path, monkeypatch):
    """The failed run that made the folder deletes its lock file while holding it; a run that
    opened the old file locks the one now in the folder instead."""
    run = tmp_path / "run"
    run.mkdir()
    real_flock, calls = fcntl.flock, []

    def removed_meanwhile(fd, operation):
        calls.append(fd)
        if len(calls) == 1:
            (run / runfolder.LOCK_FILE).unlink()
            (run / runfolder.LOCK_FILE).write_text("")
        return real_flock(fd, operation)

    monkeypatch.setattr(runfolder.fcntl, "flock", removed_meanwhile)
    lock = runfolder.RunLock(run)
    lock.acquire()
    try:
        assert len(calls) == 2
        assert os.fstat(lock.fd).st_ino == os.stat(run / runfolder.LOCK_FILE).st_ino
        assert (run / runfolder.LOCK_FILE).read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()


def test_a_failed_run_keeps_a_new_folder_that_holds_anything_else(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(OSError, match="disk full"), runfolder.claim(run, SINGLE):
        (run / "config.json").write_text("{}")
        (run / "notes.txt").write_text("someone else's")
        raise OSError(errno.ENOSPC, "disk full")
    assert (run / "notes.txt").read_text() == "someone else's"
    with pytest.raises(OSError, match="disk full"), runfolder.claim(tmp_path / "clean", SINGLE):
        (tmp_path / "clean" / "config.json").write_text("{}")
        (tmp_path / "clean" / "checkpoints").mkdir()
        raise OSError(errno.ENOSPC, "disk full")
    assert not (tmp_path / "clean").exists()


def test_a_file_as_out_dir_is_named_a_file(tmp_path):
    file = tmp_path / "afile"
    file.write_text("x")
    with pytest.raises(OSError, match=f"{file}: {file} is a file, not a folder; pick another "
                       "out_dir$") as e:
        runfolder.check_writable(file)
    assert e.value.errno == errno.ENOTDIR and file.read_text() == "x"



@pytest.mark.parametrize("target", ["missing", "self"])
def test_a_broken_symlink_as_out_dir_is_named_a_broken_symlink(tmp_path, target):
    link = tmp_path / "self"
    link.symlink_to(tmp_path / target)  # a dangling link, or one that points at itself
    with pytest.raises(OSError, match="is a broken symlink"):
        runfolder.check_writable(link)
    assert link.is_symlink()

# ---------------------------------------------------------------- the demo's folder


def test_demo_refuses_another_runs_checkpoints_before_any_work(tmp_path, tiny_data,
                                                                monkeypatch):
    run = tmp_path / "r"
    _run(run, tiny_data, max_steps=2)
    before = list_checkpoints(run)
    monkeypatch.setattr(demo_module, "_run_demo", lambda *a: pytest.fail("no work expected"))
    with pytest.raises(FileExistsError) as e:
        demo_module.run_demo(quick=True, out_dir=str(run))
    assert str(e.value) == (f"{run} holds a training run's checkpoints; pick another --out, or "
                            f"pass --overwrite to replace that run")
    assert list_checkpoints(run) == before and not demo_module.is_demo_run(run)
    monkeypatch.setattr(demo_module, "_run_demo", lambda *a: {"ran": True})
    assert demo_module.run_demo(quick=True, out_dir=str(run), overwrite=True) == {"ran": True}


def test_demo_says_out_for_a_folder_in_use(tmp_path):
    run = tmp_path / "busy"
    run.mkdir()
    holder = runfolder.RunLock(run)
    holder.acquire()
    try:
        with pytest.raises(RunInUseError, match="or pick another --out$"):
            demo_module.run_demo(quick=True, out_dir=str(run))
    finally:
        holder.release()


@pytest.mark.parametrize("moment", ["corpus", "first step"])
def test_a_demo_that_fails_before_its_first_checkpoint_leaves_no_folder(tmp_path, tiny_data,
                                                                        monkeypatch, moment):
    out = tmp_path / "new" / "demo"

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    def train_until_the_first_step(quick, out_dir, *rest):  # the demo's own run, made tiny
        monkeypatch.setattr(StepLoop, "train_step", lambda self, step: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, "No space left on device")))
        train(tiny_config(out_dir), data=tiny_data, overwrite=True)

    if moment == "corpus":
        monkeypatch.setattr(demo_module, "fastest_thread_count", lambda: 1)
        monkeypatch.setattr(demo_module, "load_corpus", ctrl_c)
    else:
        monkeypatch.setattr(demo_module, "_run_demo", train_until_the_first_step)
    with pytest.raises((KeyboardInterrupt, OSError)):
        demo_module.run_demo(quick=True, out_dir=str(out))
    assert not out.exists()


# ---------------------------------------------------------------- Ctrl-C anywhere


def test_ctrl_c_in_the_final_evaluation_keeps_the_finished_steps(tmp_path, tiny_data,
                                                                 monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(StepLoop, "evaluate", lambda self, step: (_ for _ in ()).throw(
        KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt) as e:
        _run(run, tiny_data, max_steps=3)
    final = run / "checkpoints" / "step-00000003"
    assert list_checkpoints(run) == [final]
    assert str(e.value) == (f"interrupted after step 3, in the final save or evaluation; the "
                            f"last checkpoint is {final}; continue with: qkv train --out-dir "
                            f"{run} --resume")


def test_ctrl_c_while_setting_up_a_resumed_run(tmp_path, tiny_data, monkeypatch):
    run = tmp_path / "run"
    _run(run, tiny_data, max_steps=2)
    monkeypatch.setattr(Trainer, "_restore", lambda *a: (_ for _ in ()).throw(
        KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt) as e:
        _run(run, tiny_data, max_steps=4, resume=True)
    assert str(e.value) == (f"interrupted; the last checkpoint is {run}/checkpoints/step-00000002"
                            f"; continue with: qkv train --out-dir {run} --resume")


def test_ctrl_c_before_any_checkpoint_says_so(tmp_path, tiny_data, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(Trainer, "_data", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt) as e:
        _run(run, tiny_data, max_steps=2)
    assert str(e.value) == (f"interrupted; no checkpoint exists yet, so qkv train --out-dir "
                            f"{run} --resume starts the run from scratch")


def test_a_second_ctrl_c_during_the_boundary_save(tmp_path, tiny_data, monkeypatch):
    run = tmp_path / "run"
    real_step, real_save = StepLoop.train_step, ckpt.save_checkpoint

    def interrupt_in_step_3(self, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, step)

    def second_ctrl_c_in_save_3(run_dir, step, **kwargs):
        if step == 3:
            raise KeyboardInterrupt
        return real_save(run_dir, step, **kwargs)

    monkeypatch.setattr(StepLoop, "train_step", interrupt_in_step_3)
    monkeypatch.setattr(ckpt, "save_checkpoint", second_ctrl_c_in_save_3)
    with pytest.raises(KeyboardInterrupt) as e:
        _run(run, tiny_data, max_steps=6, checkpoint_interval=2)
    assert str(e.value) == (f"interrupted at step 3 while saving step 3; the last checkpoint is "
                            f"{run}/checkpoints/step-00000002; continue with: qkv train "
                            f"--out-dir {run} --resume")


# ---------------------------------------------------------------- resume and messages


def test_train_seconds_carry_over_on_resume(tmp_path, tiny_data, monkeypatch):
    clock = iter(range(10**6))  # each reading one second later: every step takes 1 s
    monkeypatch.setattr(steps_module, "time", types.SimpleNamespace(
        perf_counter=lambda: float(next(clock))))
    run = tmp_path / "run"
    _run(run, tiny_data, max_steps=3)
    resumed = _run(run, tiny_data, max_steps=5, resume=True)
    assert resumed.train_seconds == 5.0
    logged = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [r["train_seconds"] for r in logged if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    assert ckpt.describe_checkpoints(run)[-1]["train_seconds"] == 5.0


def test_a_full_disk_at_the_first_checkpoint_claims_no_earlier_one(tmp_path, tiny_data,
                                                                   monkeypatch):
    from qkv.nn import DecoderLM, TransformerConfig

    model = DecoderLM(TransformerConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=1,
                                        max_len=8))

    def no_space(tensors, filename, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", no_space)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError) as e:
        ckpt.save_checkpoint(run, 1, model=model, tokenizer=tiny_data.tokenizer)
    message = str(e.value)
    assert "no earlier checkpoint exists" in message and "untouched" not in message
    assert message.endswith(f"free space (or fix the folder's permissions), then qkv train "
                            f"--out-dir {run} --resume")
    monkeypatch.undo()
    torch.manual_seed(0)
    ckpt.save_checkpoint(run, 1, model=model, tokenizer=tiny_data.tokenizer)
    monkeypatch.setattr(ckpt, "save_file", no_space)
    with pytest.raises(CheckpointError, match="the earlier checkpoints are untouched "
                       r"\(newest: step-00000001\); free space"):
        ckpt.save_checkpoint(run, 2, model=model, tokenizer=tiny_data.tokenizer)


def test_no_usable_checkpoint_on_resume_names_the_ways_out(tmp_path, tiny_data):
    run = tmp_path / "run"
    _run(run, tiny_data, max_steps=2)
    (list_checkpoints(run)[0] / "manifest.json").write_text("{")
    with pytest.raises(CheckpointError, match="start over with --overwrite instead of --resume, "
                       "or pick another out_dir"):
        _run(run, tiny_data, max_steps=4, resume=True)


def test_resume_and_overwrite_together_are_refused(tmp_path, tiny_data):
    with pytest.raises(ValueError, match="--resume and --overwrite cannot be used together"):
        train(tiny_config(tmp_path / "run"), data=tiny_data, resume=True, overwrite=True)
    assert not (tmp_path / "run").exists()
