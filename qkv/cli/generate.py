"""`qkv generate`: complete a prompt with a trained checkpoint, streaming token by token."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated

import typer

CACHES = ("dynamic", "static", "none")
TOP_K = 40  # sampling's default, as in the demo: greedy decoding of small models repeats itself


def sampling(temperature: float, top_k: int | None, top_p: float | None) -> dict:
    """complete()'s sampling keywords from the flags; top-k and top-p need --temperature > 0."""
    if temperature == 0:
        if top_k is not None or top_p is not None:
            flag = "--top-k" if top_k is not None else "--top-p"
            raise typer.BadParameter("it chooses among sampled tokens, but --temperature 0 is "
                                     f"greedy decoding: drop {flag} or set --temperature above 0",
                                     param_hint=flag)
        return {"temperature": 0.0}
    return {"temperature": temperature, "top_k": TOP_K if top_k is None else top_k,
            "top_p": top_p}


def _check_temperature(temperature: float) -> float:
    if not math.isfinite(temperature) or temperature < 0:
        raise typer.BadParameter(f"must be a number >= 0 (not NaN or infinity), got {temperature}")
    return temperature


def _check_top_p(top_p: float | None) -> float | None:
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise typer.BadParameter(f"must be above 0 and at most 1, got {top_p}")
    return top_p


def generate(
    checkpoint: Annotated[Path, typer.Option(
        help="a checkpoint folder, or a run folder (its newest usable checkpoint)")],
    prompt: Annotated[str, typer.Option(help="text to complete; \\n and \\t are read as "
                                             "newline and tab unless --raw")],
    max_new_tokens: Annotated[int, typer.Option(
        min=1, help="tokens to generate at most (capped, with a warning, at the model's "
                    "max_len)")] = 200,
    temperature: Annotated[float, typer.Option(
        callback=_check_temperature, help="sampling temperature; 0 is greedy decoding")] = 0.8,
    top_k: Annotated[int | None, typer.Option(
        min=1, show_default=str(TOP_K), help="sample among the k likeliest tokens")] = None,
    top_p: Annotated[float | None, typer.Option(
        callback=_check_top_p, show_default="off",
        help="sample within this probability mass (nucleus), 0 < p <= 1")] = None,
    seed: Annotated[int, typer.Option(min=0, max=2**63 - 1, help="seed of the sampler")] = 0,
    cache: Annotated[str, typer.Option(
        help="KV cache: dynamic, static or none (recompute every step)")] = "dynamic",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")] = "cpu",
    raw: Annotated[bool, typer.Option(help="take the prompt exactly as given")] = False,
) -> None:
    """Stream the model's completion of --prompt to standard output as it is generated.

    It samples at temperature 0.8 among the 40 likeliest tokens by default; --temperature 0
    decodes greedily.
    """
    from qkv.cli._errors import check_prompt, fail, user_errors, warn

    if cache not in CACHES:
        raise typer.BadParameter(f"must be dynamic, static or none, got {cache!r}",
                                 param_hint="--cache")
    decoding = sampling(temperature, top_k, top_p)
    if not raw:
        prompt = prompt.replace("\\n", "\n").replace("\\t", "\t")
    if not prompt:
        raise fail("--prompt is empty: give the text to complete")
    check_prompt(prompt)

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    with user_errors():
        from qkv.device import resolve_device
        from qkv.generate import complete
        from qkv.train import load_model

        model, tokenizer, _ = load_model(checkpoint, device=resolve_device(device),
                                         warn=warn)
        show(prompt)
        complete(model, tokenizer, prompt, max_new_tokens=max_new_tokens, seed=seed,
                 cache=None if cache == "none" else cache, on_text=show, **decoding)
    show("\n")


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
