"""One self-contained HTML page: the leaderboard tables and figures.

Self-contained means it opens from a file, offline, in any browser: the style sheet is inline,
the figures are `data:image/png;base64` URIs, there is no script and no external `src`/`href`.
Every method row carries `data-method="<name>"` so a test (or a reader's search) finds it.
"""

from __future__ import annotations

import base64
import re
from html import escape

from fpl_bench.report.leaderboard import Cell, CellTable
from fpl_bench.report.markdown import LEGEND, eps_header, section_title, table_title

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1em; margin-bottom: 0.3em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; }
td { text-align: right; white-space: nowrap; } th { background: #f4f4f4; }
th[scope=row] { text-align: left; }
.note { color: #b35900; font-size: 0.85em; } .paper { color: #666; font-size: 0.85em; }
.audit { color: #1f5fa8; font-size: 0.85em; }
.legend { color: #555; font-size: 0.9em; } figure { margin: 0.5em 0 1.5em; }
img { max-width: 100%; border: 1px solid #eee; }
"""


def data_uri(png: bytes) -> str:
    """A PNG as a data URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def inline_markdown(text: str) -> str:
    """Escape `text` and turn its **bold** and `code` spans into HTML."""
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escape(text))
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def cell_html(cell: Cell) -> str:
    """One <td>: value (bold when best), note and paper number in smaller type."""
    value = escape(cell.value)
    parts = [f"<strong>{value}</strong>" if cell.best else value]
    if cell.note:
        parts.append(f'<span class="note">[{escape(cell.note)}]</span>')
    if cell.paper:
        parts.append(f'<span class="paper">({escape(cell.paper)})</span>')
    if cell.audit:
        parts.append(f'<span class="audit">{{{escape(cell.audit)}}}</span>')
    return "<td>" + " ".join(parts) + "</td>"


def table_html(table: CellTable) -> str:
    """One <table> with a header row of eps values and one row per method."""
    header = "".join(f'<th scope="col">{escape(eps_header(e))}</th>' for e in table.eps)
    body = "\n".join(
        f'<tr data-method="{escape(method)}"><th scope="row">{escape(method)}</th>'
        + "".join(cell_html(c) for c in cells)
        + "</tr>"
        for method, cells in table.rows
    )
    return (
        f"<h3>{inline_markdown(table_title(table))}</h3>\n<table>\n"
        f'<thead><tr><th scope="col">method</th>{header}</tr></thead>\n'
        f"<tbody>\n{body}\n</tbody>\n</table>"
    )


def figure_html(name: str, png: bytes) -> str:
    """One embedded figure with its file name as caption."""
    return (
        f'<figure><img alt="{escape(name)}" src="{data_uri(png)}">'
        f"<figcaption>{escape(name)}</figcaption></figure>"
    )


def leaderboard_html(
    tables: list[CellTable],
    plots: dict[tuple[str, str, str], dict[str, bytes]],
    title: str,
    source: str,
    closing: str = "",
    legend: str = "",
) -> str:
    """The page: title, source, legend (and `legend`, e.g. the audit's), then per (dataset,
    protocol, trust) its tables and figures (`plots` keyed by that triple, file name -> PNG
    bytes)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        *([f"<p>Runs: <code>{escape(source)}</code></p>"] if source else []),
        f'<p class="legend">{inline_markdown(LEGEND)}</p>',
        *([f'<p class="legend">{inline_markdown(legend)}</p>'] if legend else []),
    ]
    section = None
    for table in tables:
        key = (table.dataset, table.protocol, table.trust, table.setup)
        if key != section:
            if section is not None:
                parts += [figure_html(n, p) for n, p in plots.get(section, {}).items()]
            section = key
            parts.append(f"<h2>{escape(section_title(*key))}</h2>")
            parts.append(f"<p>Setup: {escape(table.config)}.</p>")
        parts.append(table_html(table))
    if section is not None:
        parts += [figure_html(n, p) for n, p in plots.get(section, {}).items()]
    if closing:
        parts.append(closing)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
