"""`qkv demo`: train a small code model on the Python standard library and complete a prompt."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer


def qkv_command() -> str:
    """How the user's shell reaches this qkv: `qkv` when that is on PATH, else the script's
    path beside this interpreter (`.venv/bin/qkv` after `make demo`)."""
    script = Path(sys.executable).parent / "qkv"
    found = shutil.which("qkv")
    if not script.exists() or (found and Path(found).resolve() == script.resolve()):
        return "qkv"
    return shlex.quote(os.path.relpath(script))


def next_steps(out: str, qkv: str = "qkv") -> str:
    """The commands to try on the demo's run folder, one per line."""
    run = shlex.quote(out)
    return "\n".join([
        "next, try:",
        f"  {qkv} generate --checkpoint {run} --prompt 'def add(a, b):\\n'",
        f"  {qkv} eval --checkpoint {run}",
        f"  {qkv} runs {run}",
    ])


def demo(
    quick: Annotated[bool, typer.Option(help="a tiny run of a few seconds (for tests)")] = False,
    out: Annotated[str, typer.Option(help="run folder for the checkpoint and report")]
        = "runs/demo",
    prompt: Annotated[str, typer.Option(help="code to complete; \\n is read as a newline")]
        = "def fibonacci(n):\\n",
    max_new_tokens: Annotated[int | None, typer.Option(
        min=1, show_default="80, or what the model's max_len leaves",
        help="tokens to generate")] = None,
    overwrite: Annotated[bool, typer.Option(
        help="replace a training run in --out (an earlier demo's run is replaced anyway)")]
        = False,
) -> None:
    """Train a small code model on the Python standard library and complete a prompt.

    It builds the stdlib corpus, trains a BPE tokenizer and a small DecoderLM, compares its bits
    per byte with a byte bigram on held-out files, saves it, and streams a completion.
    """
    from qkv.cli._errors import check_prompt, fail, user_errors

    if not out:
        raise fail("--out is empty: give the folder for the demo's run")
    check_prompt(prompt)
    with user_errors():
        from qkv.train.demo import run_demo

        run_demo(quick=quick, out_dir=out, prompt=prompt.replace("\\n", "\n"),
                 max_new_tokens=max_new_tokens, overwrite=overwrite)
    typer.echo(next_steps(out, qkv_command()))


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
