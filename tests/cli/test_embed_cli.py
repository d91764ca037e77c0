"""`qkv embed` through typer's CliRunner."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qkv.cli.main import app

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


def test_bad_suffix_and_over_long_line(source, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["embed", str(source), "--out", str(tmp_path / "v.csv")])
    assert result.exit_code != 0 and "suffix must be one of" in result.output
    long = tmp_path / "long.txt"
    long.write_text("word " * 400, encoding="utf-8")
    out = tmp_path / "v.npy"
    result = runner.invoke(app, ["embed", str(long), "--out", str(out), "--no-truncate",
                                 "--device", "cpu"])
    assert result.exit_code != 0 and "over max_length=256" in result.output
    assert not out.exists()
