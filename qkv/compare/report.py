"""report.md of a `qkv compare` run, rendered from what results.json holds.

Plain markdown, readable as a text file and on GitHub: a title, the command that reproduces
the run, the machine, a summary table (each row's headline and verdict), then one section per
row with its claim, tables, figures, the published anchor and what the numbers show.
"""

from __future__ import annotations

from qkv.compare.core import markdown_table, setting_text

TITLE = "qkv compare: attention against recurrence and convolution"


def verdict(agrees: bool | None) -> str:
    """The summary table's word for a row's `agrees`."""
    return {True: "agrees", False: "disagrees", None: "no verdict"}[agrees]


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell: one line, no bare pipes."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _summary(rows: dict) -> str:
    lines = []
    for name, record in rows.items():
        result = record.get("result")
        if result is None:
            lines.append([f"{record['title']} (`{name}`)", "not run", "—"])
        else:
            stale = " (run under other settings)" if record.get("stale") else ""
            lines.append([f"[{record['title']}](#{_anchor(name)}) (`{name}`)",
                          _cell(result["headline"]), verdict(result["agrees"]) + stale])
    return markdown_table(["row", "headline", "verdict"], lines)


def _anchor(name: str) -> str:
    return f"row-{name}"


def _stale(name: str, record: dict, settings: dict) -> list[str]:
    """The note on a row run under other settings than the report's (none for the others)."""
    keys = record.get("stale") or []
    if not keys:
        return []
    there = ", ".join(f"{k}={setting_text(k, record['settings'].get(k))}" for k in keys)
    now = ", ".join(f"{k}={setting_text(k, settings.get(k))}" for k in keys)
    return [f"**Run under other settings:** {there} (this report: {now}). Rerun it with "
            f"`--only {name} --overwrite` to bring it up to date.", ""]


def _section(number: int, name: str, record: dict, settings: dict) -> list[str]:
    result = record.get("result")
    lines = [f'<a id="{_anchor(name)}"></a>', "",
             f"## {number}. {record['title']} (`{name}`)", ""]
    if result is None:
        return lines + ["Not run: run `qkv compare` with this row (`--only "
                        f"{name}`) to fill this section in.", ""]
    seconds = record.get("seconds")
    lines += _stale(name, record, settings)
    lines += [f"**Claim.** {result['claim']}", ""]
    for table in result.get("tables", []):
        lines += [table, ""]
    for figure in result.get("figures", []):
        stem = figure.rsplit("/", 1)[-1].rsplit(".", 1)[0].replace("_", " ")
        lines += [f"![{record['title']}: {stem}]({figure})", ""]
    lines += [f"**Anchor.** {result['anchor']}", "",
              f"**Findings.** {result['findings']}", "",
              f"**Verdict:** {verdict(result['agrees'])}. **Headline:** {result['headline']}", ""]
    if seconds is not None:
        lines += [f"*Ran in {seconds:.1f} s, started {record.get('started', '?')}.*", ""]
    return lines


def render(document: dict) -> str:
    """report.md from results.json's content (see qkv.compare.runner.results_document)."""
    rows = document["rows"]
    done = sum(1 for record in rows.values() if record.get("result") is not None)
    lines = [f"# {TITLE}", "",
             "Reproduce with:", "", "```", document["command"], "```", "",
             f"- machine: {document['machine']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in document["versions"].items()),
             f"- torch threads: {document['threads']}",
             f"- seed: {document['seed']}; settings: " + ", ".join(
                 f"{k}={setting_text(k, v)}" for k, v in document["settings"].items()),
             f"- written: {document['date']}; rows finished: {done} of {len(rows)}", "",
             "## Summary", "", _summary(rows), ""]
    for number, (name, record) in enumerate(rows.items(), start=1):
        lines += _section(number, name, record, document["settings"])
    return "\n".join(lines).rstrip() + "\n"
