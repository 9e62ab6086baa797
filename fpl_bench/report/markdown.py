"""Leaderboard tables as Markdown: one section per (dataset, protocol, trust), one table per
metric (rows: methods; columns: eps), cells 'mean ± std' in percent."""

from __future__ import annotations

from fpl_bench.report.leaderboard import METRIC_LABELS, Cell, CellTable

LEGEND = (
    "Accuracy in %, mean ± std over seeds (sample std; a cell of one seed shows its value "
    "alone). **Bold**: best of its column among "
    "cells whose seeds all finished. `[k/n diverged]`: k of n seeds diverged or failed, the "
    "mean is over the others. `—`: not run. A number in parentheses is the DP-FPL paper's "
    "(Tran et al., ICLR 2025, Tables 2-4; its setting and accounting differ: compare the "
    "orderings, not the cells)."
)


def eps_header(eps: str) -> str:
    """Column title of one eps value."""
    return "no DP" if eps == "none" else f"ε = {eps}"


def cell_markdown(cell: Cell) -> str:
    """'**71.2 ± 1.0** [1/3 diverged] (94.5) {ε̂ ≥ 0.21 · MIA 51.2}'; '|' cannot occur in the
    parts."""
    text = f"**{cell.value}**" if cell.best else cell.value
    if cell.note:
        text += f" [{cell.note}]"
    if cell.paper:
        text += f" ({cell.paper})"
    if cell.audit:
        text += f" {{{cell.audit}}}"
    return text


def table_title(table: CellTable) -> str:
    """'local accuracy — ours (paper)' when the paper has numbers for the table."""
    label = METRIC_LABELS.get(table.metric, table.metric)
    return f"{label} (`{table.metric}`)" + (" — ours (paper)" if table.has_paper else "")


def section_title(dataset: str, protocol: str, trust: str, setup: str = "") -> str:
    """Heading of one (dataset, protocol, trust[, setup])."""
    return f"{dataset} · {protocol} · {trust} trust" + (f" · {setup}" if setup else "")


def table_markdown(table: CellTable) -> str:
    """One Markdown table: header, alignment row, one row per method."""
    header = ["method", *(eps_header(e) for e in table.eps)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * len(table.eps),
    ]
    for method, cells in table.rows:
        lines.append("| " + " | ".join([method, *(cell_markdown(c) for c in cells)]) + " |")
    return "\n".join(lines)


def leaderboard_markdown(
    tables: list[CellTable], title: str, source: str, closing: str = "", legend: str = ""
) -> str:
    """The whole document: title, source, legend (and `legend`, e.g. the audit's), sections
    of tables, then `closing` (the facts section)."""
    parts = [f"# {title}", "", *([f"Runs: `{source}`.", ""] if source else []), LEGEND, ""]
    if legend:
        parts += [legend, ""]
    section = None
    for table in tables:
        key = (table.dataset, table.protocol, table.trust, table.setup)
        if key != section:
            section = key
            parts += [f"## {section_title(*key)}", "", f"Setup: {table.config}.", ""]
        parts += [f"### {table_title(table)}", "", table_markdown(table), ""]
    if closing:
        parts += [closing]
    return "\n".join(parts)
