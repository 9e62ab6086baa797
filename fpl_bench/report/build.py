"""Write a leaderboard: NAME.md, NAME.csv, NAME.html and NAME-plots/*.png in one folder.

    write_leaderboard(records, out=Path("leaderboards"), name="embedded", source="runs/x")
    write_leaderboard(records, ..., audits=read_audits(Path("runs/x")))   # with audit.csv
    write_leaderboard(records, ..., earlier=read_leaderboard(csv))   # add cells to a CSV

NAME.csv is the long format of `leaderboard.LEADERBOARD_COLUMNS` (fractions, not percent); it
is what `fpl-bench regress --baseline` reads back. With `audits` (the runs' audit.csv,
report/audits.py) every audited cell shows its epsilon lower bound and MIA success, the
attack-success figure joins the plots, and NAME-audit.csv holds `audits.SUMMARY_COLUMNS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fpl_bench.errors import UsageError
from fpl_bench.io import write_atomic
from fpl_bench.report.audits import AUDIT_LEGEND, CELL_KEY, audit_notes, audit_summary
from fpl_bench.report.facts import facts, facts_html, facts_markdown
from fpl_bench.report.html import leaderboard_html
from fpl_bench.report.leaderboard import cell_tables, summarize, table_groups
from fpl_bench.report.markdown import leaderboard_markdown, section_title
from fpl_bench.report.plots import figures
from fpl_bench.report.records import normalize_records

CSV_DECIMALS = 6  # of a fraction: 1e-4 percentage points, far below any seed std
DEFAULT_NAME = "leaderboard"  # the file stem when `fpl-bench leaderboard` gets no --name
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Written:
    """Paths written by `write_leaderboard`, and what was left out."""

    markdown: Path
    csv: Path
    html: Path
    facts: Path | None = None
    audit: Path | None = None  # NAME-audit.csv, where the runs were audited
    pngs: list[Path] = field(default_factory=list)
    superseded: int = 0
    dropped: list[str] = field(default_factory=list)  # cells whose earlier seeds were replaced


def check_name(name: str) -> str:
    """The output stem: letters, digits, '.', '_', '-' (no folders, no spaces)."""
    if not NAME_PATTERN.match(name):
        raise UsageError(f"--name {name!r}: use letters, digits, '.', '_' or '-', e.g. embedded")
    return name


def page_title(name: str) -> str:
    """The default title: 'fpl-bench leaderboard', with the NAME when one was given
    ('fpl-bench leaderboard: embedded'), never the default stem repeated."""
    return "fpl-bench leaderboard" if name == DEFAULT_NAME else f"fpl-bench leaderboard: {name}"


def file_stem(dataset: str, protocol: str, trust: str, setup: str = "") -> str:
    """File-name part of one (dataset, protocol, trust[, setup]), e.g.
    'synthetic-base2novel-server' or 'synthetic-base2novel-server-rounds_1'."""
    text = f"{dataset}-{protocol}-{trust}" + (f"-{setup}" if setup else "")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def render_plots(
    leaderboard: pd.DataFrame, audit: pd.DataFrame | None = None
) -> dict[tuple[str, ...], dict[str, bytes]]:
    """PNG bytes per (dataset, protocol, trust, setup), keyed by file name; `audit` (an
    `audit_summary`) adds each table's attack-success figure."""
    return {
        key: figures(part, section_title(*key), file_stem(*key), _table_audit(part, audit))
        for key, part in table_groups(leaderboard)
    }


def _table_audit(part: pd.DataFrame, audit: pd.DataFrame | None) -> pd.DataFrame | None:
    """The rows of `audit` for the table of leaderboard rows `part` (its dataset, protocol,
    trust and setup_hash); None when there are none."""
    if audit is None or audit.empty:
        return None
    first = part.iloc[0]
    keep = np.ones(len(audit), dtype=bool)
    for column in ("dataset", "protocol", "trust", "setup_hash"):
        keep &= audit[column].astype(str).to_numpy() == str(first[column])
    return audit[keep] if keep.any() else None


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    """Write bytes atomically."""
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def write_leaderboard(
    records: pd.DataFrame,
    *,
    out: Path,
    name: str = DEFAULT_NAME,
    source: str = "",
    png: bool = True,
    title: str | None = None,
    configs: dict[str, dict] | None = None,
    audits: pd.DataFrame | None = None,
    earlier: pd.DataFrame | None = None,
) -> Written:
    """Summarize `records` and write NAME.md, NAME.csv, NAME.html (figures embedded) and, when
    `png`, the figures as NAME-plots/<dataset>-<protocol>-<trust>-*.png; `audits` (the runs'
    audit.csv, `audits.read_audits`) adds the audit to the cells, a figure and NAME-audit.csv.
    `earlier` (a leaderboard CSV read back) keeps its cells that the records do not hold
    (`leaderboard.merge_cells`); audits come from the records' runs only."""
    from fpl_bench.report.leaderboard import dropped_seeds, merge_cells, superseded_configs

    name = check_name(name)
    out = Path(out)
    records = normalize_records(records)
    leaderboard = summarize(records, configs)
    dropped = []
    if earlier is not None:
        dropped = dropped_seeds(earlier, leaderboard)
        leaderboard = merge_cells(earlier, leaderboard)
    audit = audit_summary(records, audits)
    tables = cell_tables(leaderboard, audit_notes(audit))
    plots = render_plots(leaderboard, audit)
    legend = AUDIT_LEGEND if not audit.empty else ""
    heading = title or page_title(name)
    written = Written(
        markdown=out / f"{name}.md",
        csv=out / f"{name}.csv",
        html=out / f"{name}.html",
        superseded=len(superseded_configs(records)),
        dropped=dropped,
    )
    found = facts(leaderboard)
    write_text(
        written.markdown,
        leaderboard_markdown(tables, heading, source, facts_markdown(found), legend),
    )
    if not audit.empty:
        written.audit = out / f"{name}-audit.csv"
        ordered = audit.sort_values([*CELL_KEY, "attack"], kind="stable")
        write_atomic(written.audit, lambda tmp: ordered.to_csv(tmp, index=False))
    if not found.empty:
        written.facts = out / f"{name}-facts.csv"
        write_atomic(written.facts, lambda tmp: found.to_csv(tmp, index=False))
    rounded = leaderboard.round({"mean": CSV_DECIMALS, "std": CSV_DECIMALS, "paper": CSV_DECIMALS})
    write_atomic(written.csv, lambda tmp: rounded.to_csv(tmp, index=False))
    write_text(
        written.html,
        leaderboard_html(tables, plots, heading, source, facts_html(found), legend),
    )
    if png:
        for files in plots.values():
            for file_name, data in files.items():
                path = out / f"{name}-plots" / file_name
                write_bytes(path, data)
                written.pngs.append(path)
    return written
