"""`qkv generate` and `qkv eval` on a tiny trained checkpoint: defaults, validation before any
output, warnings on stderr, JSON on stdout."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from qkv.cli.main import app

runner = CliRunner()
PROMPT = "def add(a, b):\\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-step run on 120 kB of the stdlib: byte tokenizer, learned positions, max_len 32."""
    run = tmp_path_factory.mktemp("tiny") / "a-run-folder-whose-name-is-long-enough-to-be-cut-short"
    result = runner.invoke(app, [
        "train", "--max-bytes", "120000", "--tokenizer", "byte", "--seq-len", "32",
        "--batch-size", "4", "--threads", "1", "--no-progress", "--max-steps", "2",
        "--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
        "--set", "eval_batches=2", "--set", "checkpoint_interval=1", "--out-dir", str(run)])
    assert result.exit_code == 0, result.output
    return run


def _generate(run_dir, *args):
    return runner.invoke(app, ["generate", "--checkpoint", str(run_dir), "--prompt", PROMPT,
                               "--max-new-tokens", "8", *args])


def test_default_is_sampling_and_temperature_0_is_greedy(run_dir):
    greedy = _generate(run_dir, "--temperature", "0")
    assert greedy.exit_code == 0, greedy.output
    assert greedy.stdout.startswith("def add(a, b):\n") and greedy.stderr == ""
    sampled = {_generate(run_dir, "--seed", str(seed)).stdout for seed in range(4)}
    assert len(sampled) > 1  # an untrained model sampled at 0.8 among 40 tokens varies
    top_k_1 = _generate(run_dir, "--top-k", "1")  # sampling among one token is greedy
    assert top_k_1.exit_code == 0 and top_k_1.stdout == greedy.stdout


@pytest.mark.parametrize("args, words", [
    (["--temperature", "0", "--top-k", "5"], "drop --top-k or set --temperature above 0"),
    (["--temperature", "0", "--top-p", "0.9"], "drop --top-p or set --temperature above 0"),
    (["--top-p", "0"], "must be above 0 and at most 1"),
    (["--top-p", "1.5"], "must be above 0 and at most 1"),
    (["--cache", "paged"], "must be dynamic, static or none"),
    (["--temperature", "nan"], "must be a number >= 0 (not NaN or infinity), got nan"),
])
def test_bad_options_are_refused_before_any_output(run_dir, args, words):
    result = _generate(run_dir, *args)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert words in result.stderr


def test_capped_max_new_tokens_warns_on_stderr(run_dir):
    result = _generate(run_dir, "--max-new-tokens", "500", "--temperature", "0")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("def add(a, b):\n")
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: max_new_tokens=500 is capped")


def test_eval_json_is_pure_json_on_stdout(run_dir):
    result = runner.invoke(app, ["eval", "--checkpoint", str(run_dir), "--split", "validation",
                                 "--max-batches", "1", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["split"] == "validation" and metrics["bpb"] > 0
    assert all(line.startswith("warning: ") for line in result.stderr.splitlines())


def test_eval_json_stays_json_when_the_newest_checkpoint_is_damaged(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    newest = sorted((run / "checkpoints").iterdir())[-1]
    weights = next(newest.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8])
    result = runner.invoke(app, ["eval", "--checkpoint", str(run), "--split", "validation",
                                 "--max-batches", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checkpoint"] != str(newest)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and newest.name in lines[0]
    assert "falling back to" in lines[0]


def test_eval_table_shows_the_whole_checkpoint_path(run_dir):
    result = runner.invoke(app, ["eval", "--checkpoint", str(run_dir), "--split", "validation",
                                 "--max-batches", "1"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    folded = "".join(line.strip("│ ").split("│")[0].strip() for line in result.stdout.splitlines())
    assert run_dir.name in folded


def test_a_one_token_prompt_is_one_token_in_the_warning(run_dir):
    result = runner.invoke(app, ["generate", "--checkpoint", str(run_dir), "--prompt", "x",
                                 "--max-new-tokens", "500", "--temperature", "0"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "a prompt of 1 token leaves only 31 of" in lines[0], lines


def test_a_prompt_that_is_not_utf8_is_refused_before_loading(run_dir):
    for raw in ([], ["--raw"]):
        result = runner.invoke(app, ["generate", "--checkpoint", str(run_dir), "--prompt",
                                     "def \udcff\udcfe", *raw])
        assert result.exit_code == 1 and result.stdout == ""
        assert result.stderr.startswith("error: --prompt is not UTF-8 text")
        assert result.stderr.count("\n") == 1
