"""`qkv train --corpus proteins` and `--corpus FILE.fa[.gz]`, then `qkv eval` and `qkv generate`
on the protein checkpoint, and the errors a bad FASTA file gives."""

import gzip
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qkv.cli.main import app
from tests.train.test_proteins_train import write_fasta

runner = CliRunner()

FLAGS = ["--seq-len", "64", "--batch-size", "4", "--threads", "1", "--no-progress",
         "--max-steps", "2", "--set", "max_tokens=256", "--set", "model.d_model=32",
         "--set", "model.n_layers=1", "--set", "model.n_heads=2", "--set", "eval_batches=1"]


def _error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


def test_builtin_proteins(tmp_path):
    result = runner.invoke(app, ["train", "--corpus", "proteins", "--out-dir",
                                 str(tmp_path / "run"), *FLAGS])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "2,100 sequences, 680,484 residues" in output
    assert "bucketed by length" in output and "vocab 29" in output
    assert "done: step 2" in output


def test_gzip_fasta_train_eval_generate(tmp_path):
    plain = write_fasta(tmp_path / "toy.faa")
    packed = tmp_path / "toy.faa.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--corpus", str(packed), "--out-dir", str(run),
                                 *FLAGS])
    assert result.exit_code == 0, result.output
    assert "150 sequences" in " ".join(result.output.split())
    evaluated = runner.invoke(app, ["eval", "--checkpoint", str(run)])
    assert evaluated.exit_code == 0, evaluated.output
    assert "test split of" in evaluated.output and "bits per byte" in evaluated.output
    generated = runner.invoke(app, ["generate", "--checkpoint", str(run), "--prompt", "mkv",
                                    "--max-new-tokens", "5", "--seed", "1"])
    assert generated.exit_code == 0, generated.output
    assert generated.stdout.startswith("mkv")
    assert set(generated.stdout.strip()[3:]) <= set("ACDEFGHIKLMNPQRSTVWYBZJXUO")


@pytest.mark.parametrize("text, says", [
    ("", "holds no sequences"),
    (">a\nMKV\n>b\n>c\nAC\n", "line 3: header of 'b' has no residues"),
    (">a\nMK1V\n", "line 2, column 3: '1' is not a residue letter"),
    (">a\nMK-V\n", "line 2, column 3: a gap '-'"),
])
def test_bad_fasta_names_file_and_line(tmp_path, text, says):
    path = tmp_path / "bad.fasta"
    path.write_text(text)
    message = _error(runner.invoke(app, ["train", "--corpus", str(path), "--out-dir",
                                         str(tmp_path / "run"), *FLAGS]))
    assert str(path) in message and says in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_residue_tokenizer_on_text_is_refused(tmp_path):
    message = _error(runner.invoke(app, ["train", "--tokenizer", "residue", "--out-dir",
                                         str(tmp_path / "run")]))
    assert "tokenizer 'residue' is for protein corpora" in message


README = Path(__file__).resolve().parents[2] / "README.md"
README_TRAIN = next(line.removeprefix("qkv ").split("#")[0].strip()
                    for line in README.read_text(encoding="utf-8").splitlines()
                    if line.startswith("qkv train --corpus proteins"))


@pytest.mark.slow
def test_readme_protein_commands(tmp_path, monkeypatch):
    """The README's protein commands, cut to two steps and one validation batch."""
    monkeypatch.chdir(tmp_path)
    args = README_TRAIN.split()
    args[args.index("--max-steps") + 1] = "2"
    result = runner.invoke(app, [*args, "--no-progress", "--set", "eval_batches=1"])
    assert result.exit_code == 0, result.output
    assert "0 longer than seq_len cut into pieces" in " ".join(result.output.split())
    for command in ("eval --checkpoint runs/proteins --max-batches 1",
                    "generate --checkpoint runs/proteins --prompt M --max-new-tokens 20"):
        result = runner.invoke(app, command.split())
        assert result.exit_code == 0, result.output
