"""`qkv runs RUN_DIR`: a run's checkpoints with step, full path, metrics, and the one in use."""

import json

import pytest
from typer.testing import CliRunner

from qkv.cli.main import app
from qkv.train import train
from tests.train import conftest

tiny_data = conftest.tiny_data  # the shared fixture

runner = CliRunner()


def test_lists_checkpoints_with_full_paths_and_the_one_in_use(tmp_path, tiny_data):
    run = tmp_path / "a-rather-long-folder-name-for-the-run" / "run"
    config = conftest.tiny_config(run, max_steps=4, checkpoint_interval=2, eval_interval=2)
    train(config, data=tiny_data)
    result = runner.invoke(app, ["runs", str(run)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80  # rich's width when not on a terminal
    cells = [line.split("│") for line in lines if line.startswith("│")]
    assert min(len(cell[2]) for cell in cells) >= 20  # the path column comes first
    paths = "".join(cell[2].strip() for cell in cells)  # folded over lines, never cut short
    assert paths == str(run / "checkpoints" / "step-00000002") + str(run / "checkpoints" /
                                                                    "step-00000004")
    status = " ".join(" ".join(c[-2].strip() for c in cells).split())
    assert status == "usable used by --resume and eval"
    assert "…" not in result.output

    as_json = runner.invoke(app, ["runs", str(run), "--json"])
    rows = json.loads(as_json.output)
    assert [(r["step"], r["latest"]) for r in rows] == [(2, False), (4, True)]
    assert rows[1]["eval"]["bpb"] > 0


def test_missing_and_empty_run_folders(tmp_path):
    missing = runner.invoke(app, ["runs", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    empty = runner.invoke(app, ["runs", str(tmp_path)])
    assert empty.exit_code == 0 and "holds no checkpoint" in empty.output


def test_a_file_is_not_a_run_folder(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("x")
    result = runner.invoke(app, ["runs", str(file)])
    assert result.exit_code == 1
    assert "is a file, not a run folder" in result.output


CORRUPT_STATES = ['null', '"str"', '[1, 2]', '{"eval": 5}', '{"eval": [1]}',
                  '{"eval": {"loss": "a"}, "tokens_seen": "many"}']


@pytest.mark.parametrize("state", CORRUPT_STATES)
def test_a_trainer_json_that_is_json_but_not_a_state_is_a_row_with_its_problem(tmp_path, state):
    step = tmp_path / "checkpoints" / "step-00000040"
    step.mkdir(parents=True)
    (step / "trainer.json").write_text(state)
    (tmp_path / "metrics.jsonl").write_text('{"kind": "eval", "step": 40, "loss": "a"}\n')
    result = runner.invoke(app, ["runs", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "unusable" in result.output
    row = [line for line in result.output.splitlines() if line.startswith("│ ")][0]
    assert row.split("│")[3].strip() == "-"  # the loss, not a number
    rows = json.loads(runner.invoke(app, ["runs", str(tmp_path), "--json"]).output)
    assert [(r["step"], r["usable"]) for r in rows] == [(40, False)]


def test_runs_help_names_the_eval_option_and_run_dir(tmp_path):
    result = runner.invoke(app, ["runs", "--help"])
    assert "qkv eval --checkpoint RUN_DIR" in " ".join(result.output.split())
    assert "RUN_DIR" in result.output and "run_dir" not in result.output.replace("RUN_DIR", "")
