"""`qkv index` and `qkv ask`: question answering over long documents by retrieval, a thin shell
over qkv.retrieval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from qkv.cli._errors import fail

DEVICE_HELP = "auto (cuda if present, else cpu), cpu, cuda or cuda:N"
MARK = (">>> ", " <<<")  # around the best sentence when the output is not a terminal


def _encoder(device: str):
    from qkv.device import resolve_device
    from qkv.interop.minilm import _shipped

    return _shipped(resolve_device(device))


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def index(
    paths: Annotated[list[str], typer.Argument(
        metavar="PATH", help="text, Markdown and Python files, and folders to walk for them "
                                "(.txt .text .rst .md .markdown .py .pyi; hidden ones left out)")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="index folder; an index already there is updated, and the vectors "
                            "of unchanged files are reused")],
    max_tokens: Annotated[int, typer.Option(
        min=16, max=254, help="most MiniLM tokens in a passage")] = 200,
    overlap: Annotated[int, typer.Option(
        min=0, help="tokens of whole lines shared by consecutive passages of one section")] = 32,
    batch_size: Annotated[int, typer.Option(min=1, help="passages per forward pass")] = 32,
    backend: Annotated[str, typer.Option(help="qkv.attention backend")] = "auto",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
) -> None:
    """Split files into passages, embed them with all-MiniLM-L6-v2 and write a searchable index
    (crash-safely: a run killed at any point leaves the previous index whole); empty and binary
    files are skipped with a warning."""
    from rich.console import Console
    from rich.progress import Progress

    from qkv.cli._errors import user_errors

    with user_errors():
        from qkv.retrieval import build_index

        encoder = _encoder(device)
        console = Console(stderr=True)
        with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
            task = bar.add_task("embedding passages", total=None)
            built = build_index(paths, out, encoder=encoder, max_tokens=max_tokens,
                                overlap=overlap, batch_size=batch_size, backend=backend,
                                progress=lambda done, total: bar.update(task, completed=done,
                                                                        total=total))
    report = built.report
    skipped = f", {len(report.skipped):,} skipped" if report.skipped else ""
    console.print(f"indexed {_plural(len(built.files), 'file')} ({len(report.embedded):,} "
                  f"embedded, {len(report.reused):,} reused{skipped}): "
                  f"{_plural(len(built), 'passage')} ({report.passages_embedded:,} embedded) "
                  f"in {out}", highlight=False, soft_wrap=True)


def _where(hit) -> str:
    p = hit.passage
    lines = f"{p.start_line}" if p.start_line == p.end_line else f"{p.start_line}-{p.end_line}"
    title = f"  {p.title}" if p.title else ""
    return f"{hit.rank}. {hit.score:.3f}  {p.file}:{lines}{title}"


def _indent(text: str) -> str:
    return "\n".join("    " + line if line.strip() else "" for line in text.split("\n"))


def _show(hits, console) -> None:
    """The hits, best sentence highlighted on a terminal and between MARK otherwise."""
    from rich.text import Text

    for hit in hits:
        text, (s, e) = hit.passage.text, hit.sentence
        if console.is_terminal:
            body = Text(text)
            body.stylize("bold yellow", s, e)
            console.print(Text(_where(hit), style="bold"))
            for line in body.split("\n", allow_blank=True):
                line.rstrip()
                console.print(Text("    ") + line if line.plain else line, soft_wrap=True)
            console.print()
        else:
            marked = text[:s] + MARK[0] + text[s:e] + MARK[1] + text[e:]
            print(_where(hit))
            print(_indent(marked))
            print()


def ask(
    index: Annotated[Path, typer.Argument(
        metavar="INDEX", help="index folder written by `qkv index`")],
    question: Annotated[str, typer.Argument(
        metavar="QUESTION", help="the question (longer than 256 tokens: cut, with a warning)")],
    k: Annotated[int, typer.Option("--top", "-k", min=1, help="passages to show")] = 5,
    as_json: Annotated[bool, typer.Option(
        "--json", help="print a JSON list of hits on stdout: rank, score, file, start_line, "
                       "end_line, start, end, title, text, and sentence {start, end, line, "
                       "text, score}; offsets count characters of the file")] = False,
    backend: Annotated[str, typer.Option(help="qkv.attention backend")] = "auto",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
) -> None:
    """Show the passages of an index closest to a question (exact cosine similarity): rank,
    score, file:lines and section, then the passage with the sentence that best matches the
    question highlighted (between >>> and <<< when the output is not a terminal)."""
    from rich.console import Console

    from qkv.cli._errors import user_errors

    try:
        question.encode("utf-8")
    except UnicodeEncodeError:
        raise fail("QUESTION is not UTF-8 text: give it as UTF-8 (check the terminal's or the "
                   "shell's encoding)") from None
    if not question.strip():
        raise fail("QUESTION is empty: ask something", code=2)
    with user_errors():
        from qkv.retrieval import load_index
        from qkv.retrieval.index import check_model

        found = load_index(index)  # a missing or corrupt index is named before the model loads
        found.encoder = _encoder(device)
        check_model(found, found.encoder)
        hits = found.search(question, k=k, backend=backend)
        if as_json:
            typer.echo(json.dumps([hit.to_dict() for hit in hits], ensure_ascii=False,
                                  indent=2))
        else:
            _show(hits, Console())


def register(app: typer.Typer) -> None:
    from qkv.cli.main import PlainUsage

    class ListUsage(PlainUsage):
        """The usage line names a list argument PATH... (typer writes {PATH}...)."""

        def collect_usage_pieces(self, ctx) -> list[str]:
            return [piece.replace("{", "").replace("}", "")
                    for piece in super().collect_usage_pieces(ctx)]

    app.command("index", cls=ListUsage)(index)
    app.command("ask")(ask)
