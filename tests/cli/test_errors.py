"""qkv.cli._errors.user_errors: one `error:` line and exit 1, Ctrl-C as 130, warnings on stderr."""

import errno
import subprocess
import sys
import warnings

import pytest
import typer

from qkv.cli._errors import user_errors


def _exit_code(error: BaseException, capsys) -> tuple[int, str, str]:
    with pytest.raises(typer.Exit) as raised, user_errors():
        raise error
    out, err = capsys.readouterr()
    return raised.value.exit_code, out, err


@pytest.mark.parametrize("error, line", [
    (ValueError("batch_size must be positive,\ngot 0"),
     "error: batch_size must be positive, got 0"),
    (FileNotFoundError("checkpoint runs/x does not exist"),
     "error: checkpoint runs/x does not exist"),
    (FileExistsError("run folder runs/x holds checkpoints"),
     "error: run folder runs/x holds checkpoints"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/out.npy"),
     "error: /ro/out.npy: permission denied"),
    (OSError(errno.ENOSPC, "No space left on device", "runs/x/model.safetensors"),
     "error: runs/x/model.safetensors: no space left on device; free some space and run the "
     "command again"),
])
def test_user_mistakes_are_one_error_line(error, line, capsys):
    code, out, err = _exit_code(error, capsys)
    assert (code, out, err) == (1, "", line + "\n")


def test_library_error_types(capsys):
    from qkv.data import CorpusError
    from qkv.train import CheckpointError

    for error in (CorpusError("corpus x holds no text"), CheckpointError("checkpoint y is torn")):
        code, _, err = _exit_code(error, capsys)
        assert code == 1 and err == f"error: {error}\n"


def test_ctrl_c_prints_its_message_and_exits_130(capsys):
    message = "interrupted at step 7; checkpoint saved to runs/x; continue with --resume"
    assert _exit_code(KeyboardInterrupt(message), capsys) == (130, "", message + "\n")
    assert _exit_code(KeyboardInterrupt(), capsys) == (130, "", "interrupted\n")


def test_a_bug_is_not_hidden():
    with pytest.raises(TypeError), user_errors():
        raise TypeError("a bug")


def test_warnings_are_one_line_on_stderr(capsys):
    with user_errors():
        warnings.warn("max_new_tokens=500 is capped at 64:\na prompt of 3 tokens", UserWarning,
                      stacklevel=1)
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "warning: max_new_tokens=500 is capped at 64: a prompt of 3 tokens\n"


def test_a_closed_pipe_ends_quietly():
    code = ("import typer\n"
            "from qkv.cli._errors import user_errors\n"
            "def spam():\n"
            "    with user_errors():\n"
            "        for _ in range(100_000):\n"
            "            print('x' * 100, flush=True)\n"
            "typer.run(spam)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.read(10) == b"x" * 10
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1 and stderr == ""
