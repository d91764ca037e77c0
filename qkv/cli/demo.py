"""`qkv demo`: train a small code model on the Python standard library and complete a prompt."""

from __future__ import annotations

from typing import Annotated

import typer


def demo(
    quick: Annotated[bool, typer.Option(help="a tiny run of a few seconds (for tests)")] = False,
    out: Annotated[str, typer.Option(help="run folder for the checkpoint and report")]
        = "runs/demo",
    prompt: Annotated[str, typer.Option(help="code to complete")] = "def fibonacci(n):\n",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens to generate")] = 80,
) -> None:
    """Build the stdlib corpus, train a BPE tokenizer and a small DecoderLM, compare its bits
    per byte with a byte bigram on held-out files, save it, and stream a completion."""
    from qkv.cli.train import user_errors
    from qkv.train.demo import run_demo

    with user_errors():
        run_demo(quick=quick, out_dir=out, prompt=prompt.replace("\\n", "\n"),
                 max_new_tokens=max_new_tokens)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
