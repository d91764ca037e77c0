"""The `qkv` command itself: --help shows every default, --version, lazy imports, usage errors."""

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

import qkv
from qkv.cli.main import app

runner = CliRunner()
COMMANDS = typer.main.get_command(app).commands


def _shown_default(param) -> str | None:
    """What --help should print after `default:` for an option, or None if it has none."""
    if isinstance(param.show_default, str):
        return f"({param.show_default})"
    if param.default is None or (param.is_flag and not param.secondary_opts):
        return None  # required, unset, or a plain flag (off unless given)
    if param.is_flag:
        return (param.opts if param.default else param.secondary_opts)[0].lstrip("-")
    return str(param.default)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_every_default(command):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for param in COMMANDS[command].params:
        if param.param_type_name != "option":
            continue
        line = next(line for line in lines if line.strip("│ *").startswith(param.opts[0] + " "))
        assert param.help.replace("\\[", "[") in line, (param.opts, line)  # no text lost
        if (expected := _shown_default(param)) is not None:
            assert f"[default: {expected}]" in line, (param.opts, line)


def test_train_help_defaults_are_train_configs():
    from qkv.train.config import TrainConfig

    defaults = TrainConfig()
    for param in COMMANDS["train"].params:
        name = param.name
        if isinstance(param.show_default, str) and hasattr(defaults, name):
            value = getattr(defaults, name)
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                assert param.show_default == str(value), name


def test_no_arguments_show_the_help_without_an_error_line():
    result = runner.invoke(app, [])
    assert result.exit_code == 2 and result.stderr == ""
    assert "Usage" in result.stdout and "generate" in result.stdout


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"qkv {qkv.__version__}\n"


LOADED = ("import sys\nfrom qkv.cli.main import main\nsys.argv = ['qkv', *sys.argv[1:]]\n"
          "try:\n    main()\nexcept SystemExit:\n    pass\n"
          "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy'}))")


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["generate", "--help"],
                                  ["generate", "--top-p", "0"], ["eval", "--bogus"]])
def test_help_version_and_usage_errors_do_not_import_torch(argv):
    proc = subprocess.run([sys.executable, "-c", LOADED, *argv], capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.splitlines()[-1] == "[]", proc.stdout + proc.stderr


def test_usage_errors_are_one_line_and_exit_2():
    for argv, words in ((["generate", "--checkpoint", "x"], "Missing option '--prompt'"),
                        (["eval", "--bogus"], "No such option: --bogus"),
                        (["bench", "--reps", "0"], "--reps"),
                        (["nothing"], "No such command 'nothing'")):
        result = runner.invoke(app, argv)
        assert result.exit_code == 2, result.output
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
        assert words in result.stderr


def test_attention_is_the_function_and_the_subpackage():
    code = """
import qkv
import qkv.nn  # loads the subpackage qkv.attention before anyone asks for qkv.attention
import qkv.attention.flops
import torch
from qkv.attention import attention_weights
q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
ref = attention_weights(q, k, causal=True) @ v
torch.testing.assert_close(qkv.attention(q, k, v, causal=True), ref)
assert qkv.attention_varlen and qkv.attention_weights is attention_weights
assert "chunked" in qkv.backends() and callable(qkv.embed)
assert "attention" in dir(qkv)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr
