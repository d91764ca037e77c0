"""Bad inputs across every subcommand: one `error:` line on stderr, exit 1 (a mistake the
library finds) or 2 (a usage error), no traceback, and no half-written file left behind."""

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from qkv.cli.main import app

runner = CliRunner()
NO_CUDA = "CUDA is not available on this machine"
BAD_DEVICE = "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"
UNWRITABLE = "/proc/qkv-no-such-folder"  # nobody, root included, can create files here

NOT_UTF8 = "\udcff\udcfe"  # how Python hands over argv bytes 0xff 0xfe, which are not UTF-8


def bad_device(name: str) -> str:
    return f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got '{name}'"


# (argv, exit code, words the error line holds). In argv, {tmp} is the test's folder; it holds
# a text file "in.txt", a binary file "image.png", a file "blocker", "bad.toml" (not TOML),
# "unknown.toml" (an unknown key), "model.toml" (model = 3), "notes.jsonl" with a symlink
# "notes-link.jsonl" to it, and broken symlinks "dangling" (to a missing path) and "loop".
CASES = [
    # train
    (["train", "--config", "{tmp}/missing.toml"], 1, "does not exist"),
    (["train", "--config", "{tmp}/bad.toml"], 1, "not valid TOML"),
    (["train", "--config", "{tmp}/unknown.toml"], 1, "learning_rate"),
    (["train", "--set", "warmup=10"], 1, "warmup"),
    (["train", "--set", "model.d_modle=8"], 1, "d_modle"),
    (["train", "--max-steps", "many"], 2, "'--max-steps': Input should be a valid integer"),
    (["train", "--max-steps", "0", "--out-dir", "{tmp}/run"], 1, "max_steps"),
    (["train", "--device", "tpu"], 1, BAD_DEVICE),
    (["train", "--device", "cuda"], 1, NO_CUDA),
    (["train", "--corpus", "{tmp}/nope", "--out-dir", "{tmp}/run"], 1, "does not exist"),
    (["train", "--out-dir", "{tmp}/blocker/run"], 1, "blocker/run"),
    (["train", "--bogus"], 2, "No such option: --bogus"),
    (["train", "--config", "{tmp}"], 1, "is a folder, not a file"),
    (["train", "--config", "{tmp}/model.toml"], 1, "model must be a table"),
    (["train", "--set", "model=3"], 1, "model must be a table"),
    (["train", "--set", "suffixes=5"], 1, "suffixes must be a list of strings"),
    (["train", "--set", "progress=1"], 1, "progress must be true or false"),
    (["train", "--seed", "99999999999999999999999", "--out-dir", "{tmp}/run"], 1,
     "seed must be an int in [0, 2**63-1]"),
    # eval
    (["eval", "--checkpoint", "{tmp}/nothing"], 1, "does not exist"),
    (["eval", "--checkpoint", "{tmp}"], 1, "holds no checkpoint"),
    (["eval", "--checkpoint", "{tmp}", "--split", "dev"], 1, "split must be one of"),
    (["eval", "--checkpoint", "{tmp}", "--device", "tpu"], 1, BAD_DEVICE),
    (["eval", "--checkpoint", "{tmp}", "--device", "cuda"], 1, NO_CUDA),
    (["eval", "--checkpoint", "{tmp}", "--batch-size", "0"], 2, "--batch-size"),
    (["eval"], 2, "Missing option '--checkpoint'"),
    *[(["eval", "--checkpoint", "{tmp}", "--device", name], 1, bad_device(name))
      for name in ("xpu", "mps", "meta")],
    # generate
    (["generate", "--checkpoint", "{tmp}/nothing", "--prompt", "x"], 1, "does not exist"),
    (["generate", "--checkpoint", "{tmp}", "--prompt", ""], 1, "--prompt is empty"),
    (["generate", "--checkpoint", "{tmp}", "--prompt", "x", "--device", "cuda"], 1, NO_CUDA),
    (["generate", "--checkpoint", "{tmp}", "--prompt", "x", "--device", "tpu"], 1, BAD_DEVICE),
    (["generate", "--checkpoint", "{tmp}", "--prompt", "x", "--top-p", "0"], 2, "--top-p"),
    (["generate", "--checkpoint", "{tmp}", "--prompt", "x", "--temperature", "-1"], 2,
     "--temperature"),
    (["generate", "--checkpoint", "{tmp}", "--prompt", "x", "--max-new-tokens", "ten"], 2,
     "'--max-new-tokens': Input should be a valid integer"),
    (["generate", "--checkpoint", "{tmp}", "--prompt", "x", "--temperature", "0", "--top-k",
      "5"], 2, "--top-k"),
    *[(["generate", "--checkpoint", "{tmp}", "--prompt", "x", "--device", name], 1,
       bad_device(name)) for name in ("xpu", "mps", "meta")],
    (["generate", "--checkpoint", "{tmp}", "--prompt", "x", "--seed",
      "99999999999999999999999"], 2, "--seed"),
    (["generate", "--checkpoint", "{tmp}", "--prompt", "x", "--seed", "-1"], 2, "--seed"),
    (["generate", "--checkpoint", "{tmp}", "--prompt", NOT_UTF8], 1, "--prompt is not UTF-8"),
    (["generate", "--checkpoint", "{tmp}", "--prompt", "a" + NOT_UTF8, "--raw"], 1,
     "--prompt is not UTF-8"),
    *[(["generate", "--checkpoint", "{tmp}", "--prompt", "x", "--temperature", value], 2,
       "must be a number >= 0 (not NaN or infinity)") for value in ("nan", "inf")],
    # embed
    (["embed", "{tmp}/missing.txt", "-o", "{tmp}/v.npy"], 1, "no such file"),
    (["embed", "{tmp}/image.png", "-o", "{tmp}/v.npy"], 1, "is not UTF-8 text"),
    (["embed", "{tmp}/in.txt", "-o", "{tmp}/v.csv"], 2, "suffix must be one of"),
    (["embed", "{tmp}/in.txt", "-o", UNWRITABLE + "/v.npy"], 1, "cannot write"),
    (["embed", "{tmp}/in.txt", "-o", "{tmp}/blocker/v.npy"], 1, "is not a folder"),
    (["embed", "{tmp}/in.txt", "-o", "{tmp}/v.npy", "--device", "cuda"], 1, NO_CUDA),
    (["embed", "{tmp}/in.txt", "-o", "{tmp}/v.npy", "--device", "tpu"], 1, BAD_DEVICE),
    (["embed", "{tmp}/in.txt", "-o", "{tmp}/v.npy", "--batch-size", "0"], 2, "--batch-size"),
    (["embed", "-o", "{tmp}/v.npy"], 2, "Missing argument 'FILE'"),
    *[(["embed", "{tmp}/in.txt", "-o", "{tmp}/v.npy", "--device", name], 1, bad_device(name))
      for name in ("xpu", "mps", "meta")],
    (["embed", "{tmp}", "-o", "{tmp}/v.npy"], 1, "{tmp} is a folder; give a text file"),
    (["embed", "{tmp}/in.txt", "-o", "{tmp}"], 2, "{tmp} is a folder; give a file name"),
    (["embed", "{tmp}/in.txt", "-o", "{tmp}/" + "a" * 300 + ".npy"], 1,
     "the file name is too long"),
    (["embed", "{tmp}/notes.jsonl", "-o", "{tmp}/notes.jsonl"], 1,
     "-o {tmp}/notes.jsonl is the input file"),
    (["embed", "{tmp}/notes.jsonl", "-o", "{tmp}/notes-link.jsonl"], 1, "is the input file"),
    (["embed", "{tmp}/in.txt", "-o", "{tmp}/dangling/v.npy"], 1,
     "{tmp}/dangling is a broken symlink (it points to"),
    (["embed", "{tmp}/in.txt", "-o", "{tmp}/loop/v.npy"], 1,
     "{tmp}/loop is a broken symlink (it loops"),
    # bench
    (["bench", "--device", "tpu"], 1, BAD_DEVICE),
    (["bench", "--device", "cuda"], 1, NO_CUDA),
    (["bench", "--device", "cpu", "--backend", "magic"], 2, "magic"),
    (["bench", "--device", "cpu", "--n", "0"], 2, "--n"),
    (["bench", "--device", "cpu", "--reps", "0"], 2, "--reps"),
    (["bench", "--device", "cpu", "--out", "{tmp}/blocker"], 1, "is not a folder"),
    (["bench", "--device", "cpu", "--out", UNWRITABLE], 1, "cannot write"),
    (["bench", "--device", "cpu", "--out", "{tmp}/dangling"], 1,
     "{tmp}/dangling is a broken symlink"),
    # demo
    (["demo", "--max-new-tokens", "0"], 2, "--max-new-tokens"),
    (["demo", "--quick", "--out", "{tmp}/blocker/run"], 1, "blocker/run"),
    (["demo", "--quick", "--out", UNWRITABLE + "/run"], 1, UNWRITABLE),
    # runs
    (["runs", "{tmp}/nothing"], 1, "does not exist"),
    (["runs"], 2, "Missing argument"),
    # the command itself
    (["serve"], 2, "No such command 'serve'"),
]


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "in.txt").write_text("a line\nanother line\n", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "blocker").write_text("a file where a folder should be\n")
    (tmp_path / "bad.toml").write_text("max_steps = = 3\n")
    (tmp_path / "unknown.toml").write_text("learning_rate = 0.001\n")
    (tmp_path / "model.toml").write_text("model = 3\n")
    (tmp_path / "notes.jsonl").write_text('{"text": "a note"}\n')
    (tmp_path / "notes-link.jsonl").symlink_to(tmp_path / "notes.jsonl")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return tmp_path


def _argv(argv: list[str], tmp) -> list[str]:
    return [arg.replace("{tmp}", str(tmp)) for arg in argv]


def _check(code: int, stdout: str, stderr: str, expected_code: int, words: str, tmp) -> None:
    assert code == expected_code, stderr
    assert "Traceback" not in stdout + stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert words.replace("{tmp}", str(tmp)) in lines[0]
    assert stdout == ""
    leftovers = [p for p in tmp.rglob("*") if p.name.endswith((".tmp", ".partial"))
                 or ".tmp" in p.name]
    assert not leftovers, leftovers


@pytest.mark.parametrize("argv, code, words", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input(argv, code, words, folder):
    result = runner.invoke(app, _argv(argv, folder))
    _check(result.exit_code, result.stdout, result.stderr, code, words, folder)


@pytest.mark.parametrize("argv, code, words", [
    (["train", "--device", "cuda"], 1, NO_CUDA),
    (["embed", "{tmp}/image.png", "-o", "{tmp}/v.jsonl"], 1, "is not UTF-8 text"),
    (["generate", "--checkpoint", "{tmp}", "--prompt", "x", "--top-p", "0"], 2, "--top-p"),
])
def test_bad_input_as_a_process(argv, code, words, folder):
    env = {**os.environ, "COLUMNS": "80"}
    proc = subprocess.run([sys.executable, "-m", "qkv", *_argv(argv, folder)],
                          capture_output=True, text=True, timeout=120, env=env)
    _check(proc.returncode, proc.stdout, proc.stderr, code, words, folder)


def test_a_full_disk_while_saving_the_tokenizer_is_one_error_line(folder, monkeypatch):
    import qkv.data.tokenizer

    def full(path, write):  # what the tokenizers library raises: a plain Exception
        raise Exception("No space left on device (os error 28)")

    monkeypatch.setattr(qkv.data.tokenizer, "atomic_write", full)
    run = folder / "run"
    result = runner.invoke(app, [
        "train", "--max-bytes", "20000", "--tokenizer", "byte", "--seq-len", "16",
        "--batch-size", "2", "--threads", "1", "--no-progress", "--max-steps", "1",
        "--set", "model.d_model=16", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
        "--out-dir", str(run)])
    _check(result.exit_code, result.stdout, result.stderr, 1,
           f"{run / 'tokenizer.json'}: no space left on device", folder)
