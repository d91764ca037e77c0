"""`qkv embed`: all-MiniLM-L6-v2 sentence embeddings of the lines of a file, or of stdin."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from qkv.cli._errors import fail
from qkv.cli._files import check_writable_file, is_dir

FORMATS = (".npy", ".safetensors", ".jsonl")


def read_lines(source: str) -> list[str]:
    """The lines of a file ("-" for stdin), without their line ends; blank lines are kept.
    Raises ValueError naming the file if it is not UTF-8 text."""
    name = "stdin" if source == "-" else source
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                         f"{e.start}); give a text file, one sentence per line") from None
    if "\x00" in text:
        raise ValueError(f"{name} is not a text file (it holds NUL bytes); give a text file, "
                         "one sentence per line")
    return text.splitlines()


def write_vectors(out: Path, texts: list[str], vectors) -> None:
    """Write (N, dim) vectors atomically, in the format that out's suffix names. A failed write
    leaves no file and raises OSError naming `out` (errno ENOSPC for a full disk)."""
    from safetensors import SafetensorError

    from qkv.io import atomic_path, write_errors

    suffix = out.suffix.lower()
    with write_errors(out, (SafetensorError,)), atomic_path(out) as tmp:
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


def write_failure(out: Path, e: OSError) -> str:
    """The CLI's words for a failed write of `out`: a full disk says what to do."""
    if e.errno == errno.ENOSPC:
        return (f"cannot write {out}: the disk is full (no space left on device); free some "
                "space or give -o a file on another disk")
    return f"cannot write {out}: {e.strerror}" if e.strerror else str(e)


def check_not_the_input(source: str, out: Path) -> None:
    """Refuse an output that is the input file itself (also through a symlink or hard link):
    writing it would replace the text with its vectors."""
    if source == "-" or not out.exists():
        return
    try:
        same = os.path.samefile(source, out)
    except OSError:
        return
    if same:
        raise ValueError(f"-o {out} is the input file {source}; give another output file")


def too_long_message(e, source: str) -> str:
    """The CLI's words for qkv.interop.minilm.TextTooLongError: lines count from 1."""
    name = "stdin" if source == "-" else source
    return (f"line {e.index + 1} of {name} has {e.length} tokens, more than {e.limit}; "
            "drop --no-truncate to cut it")


def embed(
    source: Annotated[str, typer.Argument(
        metavar="FILE", help="text file, one sentence per line; - for stdin")],
    out: Annotated[Path, typer.Option("--out", "-o",
                                      help="output file: .npy, .safetensors or .jsonl")],
    batch_size: Annotated[int, typer.Option(min=1, help="texts per forward pass")] = 32,
    backend: Annotated[str, typer.Option(help="qkv.attention backend")] = "auto",
    device: Annotated[str, typer.Option(
        help="auto (cuda if present, else cpu), cpu, cuda or cuda:N")] = "auto",
    truncate: Annotated[bool, typer.Option(help="cut texts at 256 tokens; with --no-truncate "
                                                "a longer text is an error")] = True,
) -> None:
    """Embed each line with all-MiniLM-L6-v2 (mean-pooled, unit length, 384 floats)."""
    from rich.console import Console
    from rich.progress import Progress

    from qkv.cli._errors import user_errors

    if is_dir(out):
        raise typer.BadParameter(f"{out} is a folder; give a file name, such as "
                                 f"{out / 'vectors.npy'}", param_hint="--out")
    if out.suffix.lower() not in FORMATS:
        raise typer.BadParameter(f"suffix must be one of {list(FORMATS)}, got {out.name!r}",
                                 param_hint="--out")
    with user_errors():
        if source != "-" and Path(source).is_dir():
            raise ValueError(f"{source} is a folder; give a text file, one sentence per line")
        if source != "-" and not Path(source).is_file():
            raise FileNotFoundError(f"no such file: {source}")
        check_writable_file(out)
        check_not_the_input(source, out)
        from qkv.device import resolve_device
        from qkv.interop.minilm import TextTooLongError
        from qkv.interop.minilm import embed as embed_texts

        resolved = resolve_device(device)
        texts = read_lines(source)
        console = Console(stderr=True)
        with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
            task = bar.add_task("embedding", total=len(texts))
            try:
                vectors = embed_texts(texts, batch_size=batch_size, backend=backend,
                                      device=resolved, truncate=truncate,
                                      progress=lambda done: bar.update(task, completed=done))
            except TextTooLongError as e:
                raise fail(too_long_message(e, source)) from None
        try:
            write_vectors(out, texts, vectors.cpu())
        except OSError as e:
            raise fail(write_failure(out, e)) from None
    noun = "vector" if len(texts) == 1 else "vectors"
    console.print(f"wrote {len(texts)} {noun} of {vectors.shape[1]} floats to {out}")


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)
