"""`qkv embed`: all-MiniLM-L6-v2 sentence embeddings of the lines of a file, or of stdin."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

FORMATS = (".npy", ".safetensors", ".jsonl")


def read_lines(source: str) -> list[str]:
    """The lines of a file ("-" for stdin), without their line ends; blank lines are kept."""
    text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    return text.splitlines()


def write_vectors(out: Path, texts: list[str], vectors) -> None:
    """Write (N, dim) vectors atomically, in the format that out's suffix names."""
    from qkv.io import atomic_path

    suffix = out.suffix.lower()
    with atomic_path(out) as tmp:
        if suffix == ".npy":
            import numpy as np

            with open(tmp, "wb") as f:
                np.save(f, vectors.numpy())
        elif suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({"embeddings": vectors.contiguous()}, str(tmp))
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for text, row in zip(texts, vectors.tolist(), strict=True):
                    f.write(json.dumps({"text": text, "embedding": row}, ensure_ascii=False))
                    f.write("\n")


def embed(
    source: Annotated[str, typer.Argument(help="text file, one sentence per line; - for stdin")],
    out: Annotated[Path, typer.Option("--out", "-o",
                                      help="output file: .npy, .safetensors or .jsonl")],
    batch_size: Annotated[int, typer.Option(min=1, help="texts per forward pass")] = 32,
    backend: Annotated[str, typer.Option(help="qkv.attention backend")] = "auto",
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if present)")]
    = None,
    truncate: Annotated[bool, typer.Option(help="cut texts at 256 tokens; with --no-truncate "
                                                "a longer text is an error")] = True,
) -> None:
    """Embed each line with all-MiniLM-L6-v2 (mean-pooled, unit length, 384 floats)."""
    from rich.console import Console
    from rich.progress import Progress

    if out.suffix.lower() not in FORMATS:
        raise typer.BadParameter(f"suffix must be one of {list(FORMATS)}, got {out.name!r}",
                                 param_hint="--out")
    if source != "-" and not Path(source).is_file():
        raise typer.BadParameter(f"no such file: {source}", param_hint="SOURCE")
    texts = read_lines(source)

    from qkv.interop.minilm import embed as embed_texts

    console = Console(stderr=True)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("embedding", total=len(texts))
        try:
            vectors = embed_texts(texts, batch_size=batch_size, backend=backend, device=device,
                                  truncate=truncate,
                                  progress=lambda done: bar.update(task, completed=done))
        except ValueError as e:
            raise typer.BadParameter(str(e)) from e
    write_vectors(out, texts, vectors.cpu())
    console.print(f"wrote {len(texts)} vectors of {vectors.shape[1]} floats to {out}")


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)
