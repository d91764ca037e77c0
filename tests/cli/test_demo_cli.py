"""`qkv demo --quick` end to end, then `qkv generate` and `qkv eval` on its checkpoint."""

import json

import pytest
from typer.testing import CliRunner

from qkv.cli.demo import next_steps, qkv_command
from qkv.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    result = runner.invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output, result.stderr


def test_demo_quick(quick_run):
    out, output, _ = quick_run
    report = json.loads((out / "demo.json").read_text())
    assert "bits per byte" in output and "byte bigram" in output
    assert f"{report['bigram_test_bpb']:.3f}" in output and f"{report['test_bpb']:.3f}" in output
    assert "def fibonacci(n):" in output
    assert report["steps"] > 0 and report["tokens_per_s"] > 0
    assert (out / "checkpoints").is_dir() and (out / "metrics.jsonl").is_file()
    assert output.rstrip().endswith(next_steps(str(out), qkv_command()))


def test_next_steps_name_the_run_folder():
    assert next_steps("runs/my demo").splitlines() == [
        "next, try:",
        "  qkv generate --checkpoint 'runs/my demo' --prompt 'def add(a, b):\\n'",
        "  qkv eval --checkpoint 'runs/my demo'",
        "  qkv runs 'runs/my demo'",
    ]
    assert next_steps("r", ".venv/bin/qkv").splitlines()[2] == "  .venv/bin/qkv eval --checkpoint r"


def test_next_steps_use_a_command_the_shell_can_reach(monkeypatch, tmp_path):
    import sys

    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "qkv").write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # the venv not activated, as under `make demo`
    assert qkv_command() == "venv/bin/qkv"
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    (bin_dir / "qkv").chmod(0o755)
    assert qkv_command() == "qkv"


def test_generate_streams_from_the_quick_checkpoint(quick_run):
    out, *_ = quick_run
    args = ["generate", "--checkpoint", str(out), "--prompt", "def add(a, b):\\n",
            "--max-new-tokens", "10", "--temperature", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("def add(a, b):\n")
    assert len(result.output) > len("def add(a, b):\n") + 1
    again = runner.invoke(app, [*args, "--cache", "none"])
    assert again.output == result.output  # greedy: the KV cache changes nothing
    sampled = runner.invoke(app, [*args[:-2], "--temperature", "0.9", "--top-k", "20",
                                  "--seed", "3"])
    assert sampled.exit_code == 0, sampled.output
    default = runner.invoke(app, args[:-2])  # samples at 0.8 among the top 40
    assert default.exit_code == 0 and default.output.startswith("def add(a, b):\n")


def test_eval_on_the_quick_checkpoint(quick_run):
    out, *_ = quick_run
    result = runner.invoke(app, ["eval", "--checkpoint", str(out), "--split", "validation",
                                 "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics["split"] == "validation" and metrics["bpb"] > 0 and metrics["bigram_bpb"] > 0


def test_generate_errors(tmp_path, quick_run):
    out, *_ = quick_run
    missing = runner.invoke(app, ["generate", "--checkpoint", str(tmp_path / "nothing"),
                                  "--prompt", "x"])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    empty = runner.invoke(app, ["generate", "--checkpoint", str(out), "--prompt", ""])
    assert empty.exit_code == 1 and "--prompt is empty" in empty.output


def test_demo_refuses_a_training_runs_folder_but_not_its_own(tmp_path, quick_run):
    from qkv.train import train
    from qkv.train.demo import check_out_dir, is_demo_run
    from tests.train.conftest import tiny_config

    out, *_ = quick_run
    assert is_demo_run(out)
    check_out_dir(out, overwrite=False)  # `make demo` again on its own runs/demo
    run = tmp_path / "r"
    first = train(tiny_config(run, max_steps=1))
    result = runner.invoke(app, ["demo", "--quick", "--out", str(run)])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (f"error: {run} holds a training run's checkpoints; pick another "
                             f"--out, or pass --overwrite to replace that run\n")
    assert first.checkpoint.is_dir()


@pytest.mark.parametrize("further", ["resumed", "past_max_steps"])
def test_demo_refuses_its_own_run_once_trained_further(tmp_path, quick_run, further):
    import shutil

    from qkv.train import list_checkpoints

    out = tmp_path / "dm"
    shutil.copytree(quick_run[0], out)
    newest = list_checkpoints(out)[-1]
    if further == "resumed":  # `qkv train --out-dir dm --resume` with changed settings
        with (out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"kind": "resume", "step": 150,
                                "changed": {"max_steps": [150, 300]}}) + "\n")
    else:  # its newest checkpoint is past the demo's own max_steps
        newest = newest.rename(newest.with_name("step-00000300"))
    log = (out / "metrics.jsonl").read_bytes()
    result = runner.invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (f"error: {out} holds a training run's checkpoints; pick another "
                             f"--out, or pass --overwrite to replace that run\n")
    assert list_checkpoints(out) == [newest] and (out / "metrics.jsonl").read_bytes() == log


def test_demo_caps_its_own_completion_length_without_a_warning(quick_run):
    out, _, stderr = quick_run
    report = json.loads((out / "demo.json").read_text())
    assert "capped" not in stderr and report["completion"]


@pytest.mark.slow
def test_demo_warns_when_an_explicit_max_new_tokens_is_capped(tmp_path):
    result = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path / "d"),
                                 "--max-new-tokens", "500"])
    assert result.exit_code == 0, result.output
    assert "max_new_tokens=500 is capped at" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--prompt", "def \udcff"], "error: --prompt is not UTF-8 text: give the prompt as UTF-8 "
                                  "(check the terminal's or the shell's encoding)\n"),
    (["--out", ""], "error: --out is empty: give the folder for the demo's run\n"),
])
def test_demo_refuses_a_bad_prompt_or_out_before_any_work(tmp_path, monkeypatch, args, message):
    import qkv.train.demo as demo

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(demo, "run_demo", no_work)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path / "d"), *args])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == message
    assert list(tmp_path.iterdir()) == []
