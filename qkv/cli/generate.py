"""`qkv generate`: complete a prompt with a trained checkpoint, streaming token by token."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer


def generate(
    checkpoint: Annotated[Path, typer.Option(
        help="a checkpoint folder, or a run folder (its newest usable checkpoint)")],
    prompt: Annotated[str, typer.Option(help="text to complete; \\n and \\t are read as "
                                             "newline and tab unless --raw")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens to generate at most")] = 200,
    temperature: Annotated[float, typer.Option(
        min=0.0, help="0: greedy decoding; above 0: sampling at this temperature")] = 0.0,
    top_k: Annotated[int | None, typer.Option(min=1, help="sample among the k likeliest")]
        = None,
    top_p: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="sample within this probability mass (nucleus)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the sampler")] = 0,
    cache: Annotated[str, typer.Option(
        help="KV cache: dynamic, static or none (recompute every step)")] = "dynamic",
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    raw: Annotated[bool, typer.Option(help="take the prompt exactly as given")] = False,
) -> None:
    """Stream the model's completion of --prompt to standard output as it is generated."""
    from qkv.cli.train import user_errors
    from qkv.train import load_model
    from qkv.train.complete import complete

    if cache not in ("dynamic", "static", "none"):
        raise typer.BadParameter(f"must be dynamic, static or none, got {cache!r}",
                                 param_hint="--cache")
    if not raw:
        prompt = prompt.replace("\\n", "\n").replace("\\t", "\t")

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    with user_errors():
        model, tokenizer, _ = load_model(checkpoint, device=device,
                                         warn=lambda msg: print(f"warning: {msg}",
                                                                file=sys.stderr))
        show(prompt)
        complete(model, tokenizer, prompt, max_new_tokens=max_new_tokens,
                 temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                 cache=None if cache == "none" else cache, on_text=show)
    show("\n")


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
