"""`qkv embed` through typer's CliRunner."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qkv.cli.main import app

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in a package; never the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LINES = ["first line", "", "a third, longer line with ünïcödé"]


@pytest.fixture(scope="module")
def expected():
    import qkv

    return qkv.embed(LINES, device="cpu")


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return path


def test_npy_safetensors_jsonl(source, tmp_path, expected):
    runner = CliRunner()
    for name in ("out.npy", "out.safetensors", "out.jsonl"):
        out = tmp_path / name
        result = runner.invoke(app, ["embed", str(source), "--out", str(out), "--batch-size", "2",
                                     "--device", "cpu"])
        assert result.exit_code == 0, result.output
        if name.endswith(".npy"):
            got = torch.from_numpy(np.load(out))
        elif name.endswith(".safetensors"):
            from safetensors.torch import load_file

            got = load_file(str(out))["embeddings"]
        else:
            rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
            assert [r["text"] for r in rows] == LINES
            got = torch.tensor([r["embedding"] for r in rows])
        assert got.shape == (3, 384)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_stdin(tmp_path, expected):
    out = tmp_path / "v.npy"
    result = CliRunner().invoke(app, ["embed", "-", "-o", str(out), "--device", "cpu"],
                                input="\n".join(LINES))
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.load(out), expected.numpy(), atol=1e-6)


def _one_error(result, code=1) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_bad_suffix_and_over_long_line(source, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["embed", str(source), "--out", str(tmp_path / "v.csv")])
    assert "suffix must be one of" in _one_error(result, code=2)
    long = tmp_path / "long.txt"
    long.write_text("short line\n" + "word " * 400 + "\n", encoding="utf-8")
    out = tmp_path / "v.npy"
    result = runner.invoke(app, ["embed", str(long), "--out", str(out), "--no-truncate",
                                 "--device", "cpu"])
    assert _one_error(result) == (f"error: line 2 of {long} has 402 tokens, more than 256; "
                                  "drop --no-truncate to cut it")
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_binary_input_is_named(tmp_path):
    binary = tmp_path / "image.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    out = tmp_path / "v.npy"
    result = CliRunner().invoke(app, ["embed", str(binary), "--out", str(out)])
    assert _one_error(result) == (f"error: {binary} is not UTF-8 text (byte 0x89 at offset 0); "
                                  "give a text file, one sentence per line")
    nul = tmp_path / "nul.bin"
    nul.write_bytes(b"abc\x00def")
    assert "holds NUL bytes" in _one_error(CliRunner().invoke(app, ["embed", str(nul), "-o",
                                                                    str(out)]))
    assert not out.exists()


def test_unwritable_output_is_named_before_any_work(source, tmp_path, monkeypatch):
    import qkv.interop.minilm as minilm

    monkeypatch.setattr(minilm, "embed", lambda *a, **k: pytest.fail("embedded before checking"))
    runner = CliRunner()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "v.npy"
    message = _one_error(runner.invoke(app, ["embed", str(source), "-o", str(out)]))
    assert message == f"error: cannot write {out}: {blocker} is not a folder"
    out = tmp_path / "ro" / "v.npy"
    out.parent.mkdir()
    out.parent.chmod(0o555)
    if os.access(out.parent, os.W_OK):  # root writes anywhere: a folder nobody can write to
        out = Path("/proc/qkv-out/v.npy")
    message = _one_error(runner.invoke(app, ["embed", str(source), "-o", str(out)]))
    assert message.startswith(f"error: cannot write {out}: ") and ".tmp" not in message
    folder = tmp_path / "vectors.npy"
    folder.mkdir()
    message = _one_error(runner.invoke(app, ["embed", str(source), "-o", str(folder)]), code=2)
    assert f"{folder} is a folder; give a file name, such as {folder / 'vectors.npy'}" in message


def test_usage_line_names_the_file_argument():
    result = CliRunner().invoke(app, ["embed", "--help"])
    assert "[OPTIONS] FILE" in result.output and "{source}" not in result.output


@pytest.mark.parametrize("name, module, writer, failure", [
    ("v.npy", np, "save", OSError("115200 requested and 2016 written")),
    ("v.safetensors", "safetensors.torch", "save_file", "safetensors"),
    ("v.jsonl", None, None, OSError(28, "No space left on device")),
])
def test_a_full_disk_is_one_error_line_and_leaves_no_file(source, tmp_path, monkeypatch, name,
                                                          module, writer, failure):
    import builtins

    import safetensors.torch

    if failure == "safetensors":  # what safetensors raises when a write fails
        failure = safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, "
                                              "kind: StorageFull, message: \"No space left on "
                                              "device\" })")
    if module is None:  # .jsonl goes through open(): a file whose writes fail
        real_open = builtins.open

        class Full:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, text):
                raise failure

        monkeypatch.setattr(builtins, "open", lambda path, mode="r", *a, **k: Full(
            real_open(path, mode, *a, **k)) if mode == "w" else real_open(path, mode, *a, **k))
    else:
        def full(*args, **kwargs):
            raise failure

        monkeypatch.setattr(safetensors.torch if module != np else np, writer, full)
    import qkv.interop.minilm as minilm

    monkeypatch.setattr(minilm, "embed", lambda texts, **k: torch.zeros(len(texts), 384))
    out = tmp_path / name
    message = _one_error(CliRunner().invoke(app, ["embed", str(source), "-o", str(out)]))
    assert message == (f"error: cannot write {out}: the disk is full (no space left on device); "
                       "free some space or give -o a file on another disk")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def test_one_line_is_one_vector(tmp_path, monkeypatch):
    import qkv.interop.minilm as minilm

    monkeypatch.setattr(minilm, "embed", lambda texts, **k: torch.zeros(len(texts), 384))
    source = tmp_path / "one.txt"
    source.write_text("just one line\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["embed", str(source), "-o", str(tmp_path / "v.npy")])
    assert result.exit_code == 0, result.output
    assert "wrote 1 vector of 384 floats" in result.stderr
