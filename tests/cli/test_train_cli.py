"""`qkv train` from the command line: config files, flags, and the errors a user can cause."""

import pytest
from typer.testing import CliRunner

from qkv.cli.main import app

runner = CliRunner()

TINY_FLAGS = ["--max-bytes", "120000", "--tokenizer", "byte", "--seq-len", "32",
              "--batch-size", "4", "--threads", "1", "--no-progress",
              "--set", "model.d_model=32", "--set", "model.n_layers=1",
              "--set", "model.n_heads=2", "--set", "eval_batches=2"]


def _train(*args):
    return runner.invoke(app, ["train", *args])


def _error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


@pytest.mark.parametrize("command", ["train", "eval", "generate", "demo"])
def test_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_config_file_and_flags(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('max_steps = 50\ncheckpoint_interval = 2\n[model]\nd_model = 16\n')
    run = tmp_path / "run"
    result = _train("--config", str(config), *TINY_FLAGS, "--max-steps", "2",
                    "--out-dir", str(run))
    assert result.exit_code == 0, result.output
    assert "done: step 2" in result.output  # the flag beat the file
    assert (run / "checkpoints" / "step-00000002" / "manifest.json").is_file()

    wider = _train(*TINY_FLAGS, "--max-steps", "4", "--out-dir", str(run), "--resume",
                   "--set", "model.d_model=64")
    message = _error(wider)
    assert "model.d_model" in message and "32" in message and "64" in message

    # Resuming needs only the folder: the run's own settings are the starting point.
    further = _train("--out-dir", str(run), "--resume", "--max-steps", "3", "--no-progress")
    assert further.exit_code == 0, further.output
    assert "done: step 3" in further.output


def test_impossible_model_is_refused_before_any_file(tmp_path):
    run = tmp_path / "run"
    message = _error(_train("--out-dir", str(run), "--tokenizer", "byte",
                            "--set", "model.d_model=100000", "--set", "model.n_layers=100"))
    assert "parameters need" in message and "make it smaller" in message
    assert not run.exists()


def test_unknown_config_key_in_file(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("learning_rate = 0.001\n")
    message = _error(_train("--config", str(config)))
    assert "['learning_rate']" in message and "'lr'" in message


def test_unknown_key_via_set_and_bad_toml(tmp_path):
    assert "'warmup'" in _error(_train("--set", "warmup=10"))
    assert "d_modle" in _error(_train("--set", "model.d_modle=10"))
    bad = tmp_path / "bad.toml"
    bad.write_text("max_steps = = 3\n")
    assert "not valid TOML" in _error(_train("--config", str(bad)))
    assert "does not exist" in _error(_train("--config", str(tmp_path / "missing.toml")))


def test_empty_missing_and_non_text_corpus(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = ["--out-dir", str(tmp_path / "run")]
    assert "holds no non-empty text documents" in _error(_train("--corpus", str(empty), *out))
    assert "does not exist" in _error(_train("--corpus", str(tmp_path / "nope"), *out))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "code.py").write_text("print('hi')\n")
    (mixed / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    message = _error(_train("--corpus", str(mixed), *out))
    assert "image.png is not a text file" in message
    (mixed / "image.png").write_bytes("caf\u00e9".encode("latin-1"))
    assert "image.png is not UTF-8 text" in _error(_train("--corpus", str(mixed), *out))


def test_ctrl_c_prints_the_trainers_message_and_exits_130(tmp_path, monkeypatch):
    import qkv.train

    message = (f"interrupted at step 7; checkpoint saved to {tmp_path}/checkpoints/step-00000007; "
               f"continue with qkv train --out-dir {tmp_path} --resume")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt(message)

    monkeypatch.setattr(qkv.train, "train", interrupted)
    result = _train("--out-dir", str(tmp_path), "--no-progress")
    assert result.exit_code == 130 and result.stdout == "" and result.stderr == message + "\n"


def test_a_file_as_out_dir_and_resume_with_overwrite(tmp_path):
    file = tmp_path / "afile"
    file.write_text("x")
    message = _error(_train("--out-dir", str(file), *TINY_FLAGS))
    assert message == (f"error: cannot write to the run folder {file}: {file} is a file, not a "
                       f"folder; pick another out_dir")
    both = _train("--out-dir", str(tmp_path / "run"), "--resume", "--overwrite", *TINY_FLAGS)
    assert both.exit_code == 1 and "Traceback" not in both.output
    assert both.stderr == ("error: --resume and --overwrite cannot be used together: resume the "
                           "run in its folder (--resume), or start it over (--overwrite)\n")
    assert not (tmp_path / "run").exists()
