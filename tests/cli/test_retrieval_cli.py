"""`qkv index` and `qkv ask` through typer's CliRunner, on a tiny corpus with known answers."""

import io
import json
import os

import pytest
from typer.testing import CliRunner

from qkv.cli.main import app

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in a package; never the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DOCS = {
    "bees.md": "# Honey bees\n\nWorkers collect nectar from flowers and turn it into honey. "
               "Bees dance to show where the flowers are.\n",
    "volcano.txt": "Volcanoes erupt when magma rises through the crust.\n",
    "chess.txt": "In chess the bishop moves diagonally. The rook moves in straight lines.\n",
}


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    for name, text in DOCS.items():
        (tmp_path / "docs" / name).write_text(text, encoding="utf-8")
    return tmp_path


def run(*args):
    return CliRunner().invoke(app, [*args, "--device", "cpu"])


def one_error(result, code=1) -> str:
    lines = result.stderr.splitlines()
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_index_then_ask(corpus):
    (corpus / "docs" / "empty.txt").write_bytes(b"")
    result = run("index", "docs", "--out", "idx")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "warning: skipped docs/empty.txt: it is empty",
        "indexed 3 files (3 embedded, 0 reused, 1 skipped): 3 passages (3 embedded) in idx"]
    again = run("index", "docs", "--out", "idx")
    assert "(0 embedded, 3 reused, 1 skipped): 3 passages (0 embedded)" in again.stderr

    result = run("ask", "idx", "Which chess piece moves diagonally?", "-k", "2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("1. ") and lines[0].endswith("  docs/chess.txt:1")
    assert lines[1] == ("    >>> In chess the bishop moves diagonally. <<< The rook moves in "
                        "straight lines.")
    assert sum(line[:1].isdigit() for line in lines) == 2


def test_ask_json_is_machine_readable_with_exact_offsets(corpus):
    assert run("index", "docs", "-o", "idx").exit_code == 0
    result = run("ask", "idx", "How do bees make honey? " * 60, "--json", "-k", "9")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)  # stdout holds the JSON only
    assert "warning: query 1 of 1 has" in result.stderr and "first 256 tokens" in result.stderr
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["file"] == "docs/bees.md"
    text = (corpus / "docs" / "bees.md").read_text()
    for hit in hits[:1]:
        assert text[hit["start"]:hit["end"]] == hit["text"]
        s = hit["sentence"]
        assert text[s["start"]:s["end"]] == s["text"].strip() == s["text"]
        assert (hit["start_line"], hit["end_line"], hit["title"]) == (1, 3, "Honey bees")
        assert {"score", "line"} <= set(s)


def test_the_best_sentence_is_highlighted_on_a_terminal(corpus):
    from rich.console import Console

    from qkv.cli.retrieval import _show
    from qkv.interop.minilm import _shipped
    from qkv.retrieval import load_index

    assert run("index", "docs", "-o", "idx").exit_code == 0
    import torch

    hits = load_index("idx", encoder=_shipped(torch.device("cpu"))).search("bishop", k=1)
    out = io.StringIO()
    _show(hits, Console(file=out, force_terminal=True, color_system="standard", width=200))
    shown = out.getvalue()
    assert "\x1b[1;33mIn chess the bishop moves diagonally.\x1b[0m" in shown
    assert ">>>" not in shown


def test_bad_inputs_give_one_error_line(corpus):
    assert "no index at missing: no such folder" in one_error(run("ask", "missing", "q"))
    (corpus / "idx").mkdir()
    assert "idx is not an index: it has no manifest.json" in one_error(run("ask", "idx", "q"))
    assert run("index", "docs", "-o", "idx2").exit_code == 0
    (corpus / "idx2" / "manifest.json").write_text("{")
    assert "idx2 is a corrupt index: manifest.json is not valid JSON" in one_error(
        run("ask", "idx2", "q"))
    assert "QUESTION is empty" in one_error(run("ask", "idx2", "  "), code=2)
    assert run("index", "docs", "-o", "idx3").exit_code == 0
    manifest = json.loads((corpus / "idx3" / "manifest.json").read_text())
    manifest["model"]["sha256"] = "0" * 64
    (corpus / "idx3" / "manifest.json").write_text(json.dumps(manifest))
    assert "idx3 was built with sentence-transformers/all-MiniLM-L6-v2 (weights sha256 " \
           "000000000000..., dim 384, max_length 256), but the encoder is" in one_error(
               run("ask", "idx3", "q"))
    assert "'--top' / '-k'" in one_error(run("ask", "idx2", "q", "-k", "0"), code=2)
    assert "paths: nowhere does not exist" in one_error(run("index", "nowhere", "-o", "i3"))
    assert "out: docs/bees.md is a file" in one_error(run("index", "docs", "-o",
                                                          "docs/bees.md"))
    assert "holds no index but other files" in one_error(run("index", "docs", "-o", "docs"))
    assert "Missing argument 'PATH'" in one_error(run("index", "-o", "i4"), code=2)
    assert "--max-tokens" in one_error(run("index", "docs", "-o", "i5", "--max-tokens", "300"),
                                       code=2)
    (corpus / "blank").mkdir()
    (corpus / "blank" / "b.txt").write_bytes(b"\x00\x01")
    result = run("index", "blank", "-o", "i6")
    assert result.exit_code == 1 and result.stderr.splitlines() == [
        "warning: skipped blank/b.txt: it is binary (it holds NUL bytes)",
        "error: nothing to index in blank: no text, Markdown or Python file left after skipping"]
    assert not (corpus / "i6" / "manifest.json").exists()


def test_help_says_how_the_sentence_is_marked():
    result = CliRunner().invoke(app, ["ask", "--help"], terminal_width=200)
    assert result.exit_code == 0 and "between >>> and <<<" in result.output
    result = CliRunner().invoke(app, ["index", "--help"], terminal_width=200)
    assert "Usage: qkv index [OPTIONS] PATH..." in result.output
