"""A run folder never loses or garbles a run: one run at a time, a log that matches the
checkpoint resumed from, settings that stay those of the run, clear errors, and Ctrl-C."""

import errno
import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from qkv.train import RunInUseError, list_checkpoints, runfolder, train
from qkv.train import metrics as metrics_module
from qkv.train.steps import StepLoop
from tests.train.conftest import tiny_config


def _run(run_dir, tiny_data, resume=False, **overrides):
    return train(tiny_config(run_dir, **overrides), data=tiny_data, resume=resume)


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def _train_steps(run_dir) -> list[int]:
    return [r["step"] for r in _records(run_dir) if r["kind"] == "train"]


def test_resume_without_a_checkpoint_starts_a_fresh_log(tmp_path, tiny_data):
    run = tmp_path / "run"
    _run(run, tiny_data, max_steps=3)
    for path in list_checkpoints(run):  # as if killed before its first checkpoint
        path.rename(path.with_name(".gone"))
    result = _run(run, tiny_data, resume=True, max_steps=3)
    assert result.resumed_from is None
    assert _train_steps(run) == [1, 2, 3]


def test_torn_line_is_dropped_on_resume(tmp_path, tiny_data):
    run = tmp_path / "run"
    _run(run, tiny_data, max_steps=4, checkpoint_interval=2)
    (run / "metrics.jsonl").open("a").write('{"kind": "train", "step": 5, "lo')
    list_checkpoints(run)[-1].rename(run / "checkpoints" / ".step-00000004.del-1")
    _run(run, tiny_data, resume=True, max_steps=4, checkpoint_interval=2)
    assert _train_steps(run) == [1, 2, 3, 4]  # every line parses, no step twice


def test_a_cut_short_append_leaves_no_half_record(tmp_path, monkeypatch):
    log = metrics_module.MetricsLog(tmp_path)
    log.append({"kind": "train", "step": 1})
    before = log.path.read_bytes()
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:7]))
    with pytest.raises(OSError, match="No space left"):
        log.append({"kind": "train", "step": 2})
    assert log.path.read_bytes() == before


def test_second_run_on_the_same_folder_names_the_holder(tmp_path, tiny_data):
    run = tmp_path / "run"
    run.mkdir()
    holder = runfolder.RunLock(run)
    holder.acquire()
    busy = rf"in use by another qkv run \(process {os.getpid()}\)"
    with pytest.raises(RunInUseError, match=busy):
        _run(run, tiny_data, max_steps=1)
    assert not (run / "checkpoints").exists()
    holder.release()
    assert _run(run, tiny_data, max_steps=1).step == 1


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, tiny_data):
    run = tmp_path / "run"
    run.mkdir()
    (run / runfolder.LOCK_FILE).write_text("999999\n")  # its holder died: no flock on it
    assert _run(run, tiny_data, max_steps=1).step == 1


def test_resume_refuses_settings_that_define_the_run_and_logs_the_others(tmp_path, tiny_data,
                                                                        capsys):
    run = tmp_path / "run"
    _run(run, tiny_data, max_steps=2)
    config_before = (run / "config.json").read_text()
    with pytest.raises(ValueError) as e:
        _run(run, tiny_data, resume=True, max_steps=4, tokenizer="bpe", seed=3,
             max_bytes=100_000)
    message = str(e.value)
    assert "--resume cannot change the settings that define the run" in message
    for part in ("tokenizer: 'byte' in the run, 'bpe' now", "seed: 0 in the run, 3 now",
                 "max_bytes: 120000 in the run, 100000 now"):
        assert part in message
    assert (run / "config.json").read_text() == config_before
    capsys.readouterr()
    result = _run(run, tiny_data, resume=True, max_steps=4, eval_interval=3, min_lr=1e-4)
    assert result.step == 4
    assert "changed settings: max_steps 2 -> 4" in " ".join(capsys.readouterr().out.split())
    resumes = [r for r in _records(run) if r["kind"] == "resume"]
    assert resumes == [{"kind": "resume", "step": 2, "changed": {
        "max_steps": [2, 4], "min_lr": [3e-4, 1e-4], "eval_interval": [100, 3]}}]
    assert json.loads((run / "config.json").read_text())["max_steps"] == 4


def test_full_disk_while_cleaning_the_log_on_resume(tmp_path, tiny_data, monkeypatch):
    run = tmp_path / "run"
    _run(run, tiny_data, max_steps=2)
    (run / "metrics.jsonl").open("a").write("torn")
    before = (run / "metrics.jsonl").read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(metrics_module, "atomic_write_text", no_space)
    with pytest.raises(OSError, match=r"could not rewrite .*metrics\.jsonl.*No space left on "
                                      r"device; the log is unchanged"):
        _run(run, tiny_data, resume=True, max_steps=3)
    assert (run / "metrics.jsonl").read_bytes() == before


def test_unwritable_out_dir_is_refused_up_front(tmp_path, tiny_data, monkeypatch):
    def read_only(folder):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(runfolder, "probe_writable", read_only)
    with pytest.raises(PermissionError, match=r"cannot write to the run folder .*run: "
                                              r"Permission denied; pick another out_dir"):
        _run(tmp_path / "run", tiny_data, max_steps=1)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_dir_for_real(tmp_path, tiny_data):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="cannot write to the run folder"):
            _run(run, tiny_data, max_steps=1)
    finally:
        run.chmod(0o755)


def test_a_failed_run_leaves_no_empty_folder(tmp_path):
    run = tmp_path / "new" / "run"
    with pytest.raises(FileNotFoundError):
        train(tiny_config(run, corpus=str(tmp_path / "missing")))
    assert not run.exists()


def test_resuming_a_finished_run_changes_nothing(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    first = _run(run, tiny_data, max_steps=3)
    log = (run / "metrics.jsonl").read_bytes()
    manifest = first.checkpoint / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    capsys.readouterr()
    again = _run(run, tiny_data, resume=True, max_steps=3)
    assert again.already_complete and again.step == 3 and again.checkpoint == first.checkpoint
    assert again.eval is None and again.tokens_per_s == 0.0
    assert (run / "metrics.jsonl").read_bytes() == log
    assert manifest.stat().st_mtime_ns == stamp and list_checkpoints(run) == [first.checkpoint]
    assert "is complete" in " ".join(capsys.readouterr().out.split())


def test_ctrl_c_saves_at_the_current_step_and_resumes_exactly(tmp_path, tiny_data,
                                                              monkeypatch):
    straight = _run(tmp_path / "straight", tiny_data, max_steps=6)
    real_step = StepLoop.train_step

    def interrupt_during_step_3(self, step):
        if step == 2:  # 0-based: the third step; the signal lands mid-step
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, step)

    monkeypatch.setattr(StepLoop, "train_step", interrupt_during_step_3)
    run = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as e:
        _run(run, tiny_data, max_steps=6)
    saved = run / "checkpoints" / "step-00000003"
    assert str(e.value) == (f"interrupted at step 3; checkpoint saved to {saved}; continue "
                            f"with: qkv train --out-dir {run} --resume")
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C works as before again
    monkeypatch.setattr(StepLoop, "train_step", real_step)
    resumed = _run(run, tiny_data, resume=True, max_steps=6)
    assert resumed.resumed_from == 3
    for step in (4, 5, 6):
        assert resumed.losses[step] == pytest.approx(straight.losses[step], abs=1e-6)


def test_output_files_follow_the_umask(tmp_path, tiny_data):
    old = os.umask(0o022)
    try:
        result = _run(tmp_path / "run", tiny_data, max_steps=1)
    finally:
        os.umask(old)
    files = [*result.checkpoint.iterdir(), result.run_dir / "config.json",
             result.run_dir / "tokenizer.json", result.run_dir / "metrics.jsonl"]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_fallbacks_and_recoveries_are_warnings_not_stdout(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    _run(run, tiny_data, max_steps=4, checkpoint_interval=2)
    newest = list_checkpoints(run)[-1]
    newest.rename(run / "checkpoints" / ".step-00000004.old-1")  # a replacement cut short
    with pytest.warns(UserWarning, match=r"recovered .*step-00000004 from a save that was cut"):
        assert _run(run, tiny_data, resume=True, max_steps=4).already_complete
    (newest / "model.safetensors").write_bytes(b"broken")
    capsys.readouterr()
    with pytest.warns(UserWarning, match="falling back to step-00000002"):
        _run(run, tiny_data, resume=True, max_steps=4, checkpoint_interval=2)
    out = " ".join(capsys.readouterr().out.split())
    assert "falling back" not in out and "resumed from" in out
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004"]


def test_a_run_in_another_process_holds_the_folder_until_it_dies(tmp_path, tiny_data):
    run = tmp_path / "run"
    run.mkdir()
    script = ("import sys, time; from qkv.train.runfolder import RunLock; "
              f"RunLock({str(run)!r}).acquire(); print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUseError, match=rf"\(process {holder.pid}\)"):
            _run(run, tiny_data, max_steps=1)
    finally:
        holder.kill()
        holder.wait()
    assert _run(run, tiny_data, max_steps=1).step == 1  # the dead holder's lock is taken over


def test_atomic_writes_follow_the_umask_whatever_the_writer_does(tmp_path):
    from qkv.io import atomic_write, atomic_write_text

    def private_writer(path):  # replaces the file with an owner-only one, as some libraries do
        path.unlink()
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))

    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "weights.bin", private_writer)
        atomic_write_text(tmp_path / "report.json", "{}")
    finally:
        os.umask(old)
    for name in ("weights.bin", "report.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name


@pytest.mark.parametrize("failure", [FileNotFoundError("corpus /nonexistent not found"),
                                     KeyboardInterrupt()])
def test_overwrite_keeps_the_old_run_until_the_new_one_is_built(tmp_path, tiny_data,
                                                                monkeypatch, failure):
    run = tmp_path / "ow"
    _run(run, tiny_data, max_steps=3, checkpoint_interval=3)
    checkpoints, log = list_checkpoints(run), (run / "metrics.jsonl").read_bytes()
    assert checkpoints

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr("qkv.train.loop.prepare_data", fail)
    with pytest.raises(type(failure)) as caught:
        train(tiny_config(run, max_steps=3), overwrite=True)
    assert list_checkpoints(run) == checkpoints
    assert all(path.is_dir() for path in checkpoints)
    assert (run / "metrics.jsonl").read_bytes() == log
    if isinstance(failure, KeyboardInterrupt):
        assert "unchanged" in str(caught.value)


def test_interrupted_message_quotes_the_run_folder(tmp_path):
    from qkv.train.steps import interrupted_message
    message = interrupted_message("interrupted", tmp_path / "sp ace", None)
    assert f"qkv train --out-dir '{tmp_path / 'sp ace'}' --resume" in message
