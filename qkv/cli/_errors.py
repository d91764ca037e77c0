"""How the `qkv` command reports what went wrong: one line on stderr, and an exit code.

- A user's mistake (a ValueError, a missing or unwritable file, an unusable corpus or
  checkpoint) prints `error: <message>` and exits 1.
- Ctrl-C prints the interruption's message (or "interrupted") and exits 130.
- A closed pipe on stdout (`qkv eval --json | head -1`) ends the command quietly.
- A warning prints `warning: <message>` on stderr, so that stdout holds only the output.
- A usage error from the command line parser prints `error: <message> (see 'qkv CMD --help')`
  and exits 2 (see `UsageErrorsOnOneLine` in qkv.cli.main).

The checks look up qkv.data and qkv.train only if they are loaded already: an exception of
theirs cannot exist otherwise, and `qkv --help` must not pay for importing torch.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import warnings
from collections.abc import Iterator

import typer

USER_ERRORS = (ValueError, OSError)  # OSError covers FileNotFoundError, PermissionError, disk full


def one_line(message: object) -> str:
    """The message with its lines joined, so that it prints as one line."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def fail(message: object, code: int = 1) -> typer.Exit:
    """Print `error: message` on stderr; the typer.Exit(code) to raise."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    return typer.Exit(code)


def _library_errors() -> tuple[type[BaseException], ...]:
    kinds = []
    if "qkv.data" in sys.modules:
        kinds.append(sys.modules["qkv.data"].CorpusError)
    if "qkv.train" in sys.modules:
        kinds.append(sys.modules["qkv.train"].CheckpointError)
    return tuple(kinds)


def warn(message: object) -> None:
    """Print `warning: message` as one line on stderr (the library's `warn=` callbacks)."""
    print(f"warning: {one_line(message)}", file=sys.stderr)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    warn(message)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user's mistake into one `error: ...` line and exit 1 (130 for Ctrl-C); print
    warnings as one `warning: ...` line each on stderr."""
    with warnings.catch_warnings():
        warnings.showwarning = _warning_line
        try:
            yield
        except KeyboardInterrupt as e:
            print(one_line(e) or "interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except BrokenPipeError:  # the reader left (`qkv eval --json | head`): stop quietly
            _silence_stdout()
            raise typer.Exit(1) from None
        except Exception as e:
            if isinstance(e, USER_ERRORS + _library_errors()):
                raise fail(_describe(e)) from None
            raise


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush cannot fail again."""
    with contextlib.suppress(OSError, ValueError):  # stdout is no file (a test's capture)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _describe(e: Exception) -> str:
    """An OSError as `path: reason` (no errno); anything else as its message."""
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        advice = "; free some space and run the command again" if e.errno == errno.ENOSPC else ""
        return f"{where}{e.strerror[0].lower()}{e.strerror[1:]}{advice}"
    return str(e) or type(e).__name__


def check_prompt(prompt: str) -> None:
    """Refuse (error line, exit 1) a --prompt whose bytes are not UTF-8 text: such bytes reach
    argv as lone surrogates, which no tokenizer takes."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise fail("--prompt is not UTF-8 text: give the prompt as UTF-8 (check the "
                   "terminal's or the shell's encoding)") from None
