"""Regression check: a committed leaderboard CSV (the baseline) against fresh runs.

A comparison cell is (method, dataset, protocol, trust, eps, metric, config_hash): a baseline
cell is compared only with runs of the same configuration (the leaderboard records each cell's
`config_hash` and key fields). For each matched baseline cell with a number, delta = ours -
baseline (fractions), and

    allowed drop = max(tolerance, k * baseline std over seeds)

A cell regresses when its drop exceeds the allowed one, or when the baseline's seeds all
finished and ours did not (a diverged or failed seed; no number at all counts as such).

`rerun_plan` turns the chosen baseline cells into the configurations to run again (the
leaderboard records each cell's resolved configuration and seeds): `fpl-bench regress` without
`--runs` runs (or resumes) exactly those cells in a cache folder, then compares.

A baseline cell with no run of its configuration is `unmatched` (said plainly, with the key
fields in which the runs' cell differs, e.g. rounds 20 against 10): it is not checked and never
a regression. Cells the baseline does not have are `new` and never fail the check either.

Bad input (UsageError, exit 2): a baseline that is not a leaderboard CSV (or one written before
leaderboards recorded configurations), and runs that match no baseline cell at all (nothing
would be checked).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fpl_bench.errors import UsageError
from fpl_bench.report.leaderboard import LEADERBOARD_COLUMNS, SETUP_FIELDS, shown
from fpl_bench.report.records import normalize_eps, sorted_eps

CELL_KEY: tuple[str, ...] = ("method", "dataset", "protocol", "trust", "eps", "metric")
COMPARE_KEY: tuple[str, ...] = (*CELL_KEY, "config_hash")
DELTA_COLUMNS: tuple[str, ...] = (
    *COMPARE_KEY,
    "baseline",
    "baseline_std",
    "current",
    "current_std",
    "delta",
    "allowed",
    "baseline_status",
    "current_status",
    "verdict",
    "note",
)
DEFAULT_TOLERANCE = 0.02  # 2 percentage points
DEFAULT_K = 2.0
SHOW_MISSING = 3  # cells named in the error about missing cells


def read_leaderboard(path: Path | str, what: str = "baseline") -> pd.DataFrame:
    """A leaderboard CSV written by `fpl-bench leaderboard`; UsageError, one line naming the
    file (as `what`: the option that gave it), when it is missing, empty, lacks columns or
    holds no rows. Hashes, seeds and configurations stay text ('007e...' keeps its zeros)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(
            f"{what} {path} is a folder; give its leaderboard CSV, e.g. {path}/NAME.csv"
        )
    if not path.is_file():
        raise UsageError(
            f"{what} {path} not found; write one with `fpl-bench leaderboard --out DIR --name NAME`"
        )
    text_columns = {c: str for c in ("eps", "config_hash", "setup_hash", "seeds", "config")}
    try:
        frame = pd.read_csv(path, dtype=text_columns)
    except pd.errors.EmptyDataError:
        raise UsageError(f"{what} {path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        reason = " ".join(str(err).split())[:120]
        raise UsageError(f"{what} {path} is not a leaderboard CSV ({reason})") from None
    missing = [c for c in LEADERBOARD_COLUMNS if c not in frame.columns]
    if missing == ["config_hash", *SETUP_FIELDS, "setup_hash"] or (
        "mean" in frame.columns and "config_hash" in missing
    ):
        raise UsageError(
            f"{what} {path} records no configuration per cell (written by an older "
            "fpl-bench): regenerate it with `fpl-bench leaderboard --runs DIR` from its runs"
        )
    if missing:
        raise UsageError(
            f"{what} {path} is not a leaderboard CSV: missing columns {', '.join(missing)}"
        )
    if frame.empty:
        raise UsageError(f"{what} {path} holds no cells (header only)")
    frame["eps"] = frame["eps"].map(normalize_eps)
    for column in ("mean", "std", "paper"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    for column in ("config_hash", "setup_hash", "seeds", "config"):
        frame[column] = frame[column].fillna("").astype(str)
    return frame


def cell_label(row: pd.Series) -> str:
    """'dpfpl synthetic base2novel server eps=0.5 local_acc'."""
    return " ".join(str(row[c]) if c != "eps" else f"eps={row[c]}" for c in CELL_KEY)


def config_text(row: pd.Series, fields: tuple[str, ...] = SETUP_FIELDS) -> str:
    """'rounds 10, local_epochs 1, ...': the key fields of one leaderboard row."""
    return ", ".join(f"{f} {shown(row[f])}" for f in fields)


def difference(baseline_row: pd.Series, current: pd.DataFrame) -> str:
    """Why a baseline cell has no run of its configuration: the key fields in which the runs'
    rows of the same cell differ ('runs: rounds 20 (baseline 10)'), or that the runs lack the
    cell."""
    same = current
    for c in CELL_KEY:
        same = same[same[c].astype(str) == str(baseline_row[c])]
    if same.empty:
        return "no run of this cell"
    other = same.iloc[-1]
    differ = [f for f in SETUP_FIELDS if shown(other[f]) != shown(baseline_row[f])]
    if not differ:
        return f"runs have config {other['config_hash']} (method options differ)"
    return "runs: " + ", ".join(
        f"{f} {shown(other[f])} (baseline {shown(baseline_row[f])})" for f in differ
    )


def verdict(
    *, baseline: float, allowed: float, current: float, baseline_ok: bool, current_ok: bool
) -> str:
    """ok | regression | new | n/a for one cell (NaN baseline: n/a; NaN current: see below)."""
    if math.isnan(baseline):
        return "n/a"
    if baseline_ok and not current_ok:
        return "regression"
    if math.isnan(current):
        return "regression" if baseline_ok else "n/a"
    return "regression" if baseline - current > allowed else "ok"


@dataclass(frozen=True)
class Thresholds:
    """allowed drop = max(tolerance, k * baseline std)."""

    tolerance: float = DEFAULT_TOLERANCE
    k: float = DEFAULT_K

    def allowed(self, baseline_std: float) -> float:
        std = 0.0 if math.isnan(baseline_std) else baseline_std
        return max(self.tolerance, self.k * std)


def compare(
    baseline: pd.DataFrame,
    current: pd.DataFrame,
    thresholds: Thresholds,
    baseline_name: str = "baseline",
    how_to_run: str = "the suite that made it",
) -> pd.DataFrame:
    """Deltas per cell (`DELTA_COLUMNS`) in baseline order, then the cells new in `current`.

    `baseline` and `current` are leaderboards (`leaderboard.summarize` / `read_leaderboard`);
    `how_to_run` completes the refusal when no run matches ('e.g. ...').
    """
    key = list(COMPARE_KEY)
    current = current.assign(config_hash=current["config_hash"].astype(str))
    joined = baseline.assign(_order=range(len(baseline))).merge(
        current.assign(_order_c=range(len(current))),
        on=key,
        how="outer",
        suffixes=("_b", "_c"),
        indicator=True,
    )
    # outer merges sort their keys: restore baseline order, then new cells in current order
    joined = joined.assign(
        _order=joined["_order"].fillna(len(baseline) + joined["_order_c"])
    ).sort_values("_order", kind="stable")
    if not (joined["_merge"] == "both").any():
        first_base, first_run = baseline.iloc[0], current.iloc[0]
        raise UsageError(
            f"no run has the configuration of any cell of baseline {baseline_name} "
            f"(baseline: {config_text(first_base)}; runs: {config_text(first_run)}): "
            f"run the baseline's configuration, e.g. {how_to_run}"
        )
    rows = []
    for _, row in joined.iterrows():
        new = row["_merge"] == "right_only"
        unmatched = row["_merge"] == "left_only"
        base = math.nan if new else float(row["mean_b"])
        base_std = math.nan if new else float(row["std_b"])
        ours = math.nan if unmatched else float(row["mean_c"])
        allowed = thresholds.allowed(base_std)
        if unmatched:
            base_row = baseline.iloc[int(row["_order"])]
            rows.append(
                {
                    **{c: row[c] for c in key},
                    "baseline": base,
                    "baseline_std": base_std,
                    "current": math.nan,
                    "current_std": math.nan,
                    "delta": math.nan,
                    "allowed": allowed,
                    "baseline_status": row["status_b"],
                    "current_status": "",
                    "verdict": "unmatched",
                    "note": difference(base_row, current),
                }
            )
            continue
        rows.append(
            {
                **{c: row[c] for c in key},
                "baseline": base,
                "baseline_std": base_std,
                "current": ours,
                "current_std": float(row["std_c"]),
                "delta": ours - base,
                "allowed": allowed,
                "baseline_status": "" if new else row["status_b"],
                "current_status": row["status_c"],
                "verdict": "new"
                if new
                else verdict(
                    baseline=base,
                    allowed=allowed,
                    current=ours,
                    baseline_ok=row["status_b"] == "finished",
                    current_ok=row["status_c"] == "finished",
                ),
                "note": "",
            }
        )
    return pd.DataFrame(rows, columns=list(DELTA_COLUMNS))


def matched_runs(baseline: pd.DataFrame, current: pd.DataFrame) -> pd.DataFrame:
    """The rows of `current` (a leaderboard) that are cells of the baseline in the baseline's
    configuration: what the baseline's facts are checked against."""
    keys = baseline[list(COMPARE_KEY)].astype(str).drop_duplicates()
    current = current.assign(config_hash=current["config_hash"].astype(str))
    return current.merge(keys, on=list(COMPARE_KEY), how="inner")


def fact_lines(baseline: pd.DataFrame, current: pd.DataFrame) -> list[str]:
    """One line per fact (report/facts.py) that holds in the baseline and no longer holds in
    the runs of its configurations."""
    from fpl_bench.report.facts import facts, lost_facts, table_name

    lost = lost_facts(facts(baseline), facts(matched_runs(baseline, current)))
    return [
        f"fact {row['fact']} ({table_name(row)}) held in the baseline and no longer holds: "
        f"{row['numbers_c']}"
        for _, row in lost.iterrows()
    ]


def regressions(deltas: pd.DataFrame) -> pd.DataFrame:
    """The rows whose verdict is `regression`."""
    return deltas[deltas["verdict"] == "regression"]


def _pp(value: float, signed: bool = False) -> str:
    """A fraction in percentage points ('—' for NaN)."""
    if math.isnan(value):
        return "—"
    points = round(100 * value, 2) + 0.0  # + 0.0 turns -0.0 into 0.0: no '-0.00'
    return f"{points:+.2f}" if signed else f"{points:.2f}"


def deltas_markdown(deltas: pd.DataFrame, thresholds: Thresholds, title: str) -> str:
    """The deltas as one Markdown table (percentage points), regressions in bold."""
    lines = [
        f"# {title}",
        "",
        f"Allowed drop per cell: max({_pp(thresholds.tolerance)} pp, "
        f"{thresholds.k:g} x the baseline's seed std). Values in %; delta = ours - baseline.",
        "",
        "| method | dataset | protocol | trust | eps | metric | config | baseline | ours | delta "
        "| allowed | status | verdict |",
        "|---|---|---|---|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for _, row in deltas.iterrows():
        mark = "**regression**" if row["verdict"] == "regression" else row["verdict"]
        if row["note"]:
            mark += f" ({row['note']})"
        status = row["current_status"]
        if row["baseline_status"] and row["baseline_status"] != status:
            status = f"{row['baseline_status']} → {status}"
        lines.append(
            "| "
            + " | ".join(
                [
                    *(str(row[c]) for c in COMPARE_KEY),
                    _pp(row["baseline"]),
                    _pp(row["current"]),
                    _pp(row["delta"], signed=True),
                    _pp(row["allowed"]),
                    status,
                    mark,
                ]
            )
            + " |"
        )
    lines += ["", summary_line(deltas)]
    return "\n".join(lines) + "\n"


def summary_line(deltas: pd.DataFrame) -> str:
    """'0 regression(s) in 45 compared cell(s); 3 baseline cell(s) with no run of their
    configuration (not checked); 2 new.'"""
    counts = deltas["verdict"].value_counts()
    compared = int(counts.get("ok", 0) + counts.get("regression", 0) + counts.get("n/a", 0))
    text = f"{int(counts.get('regression', 0))} regression(s) in {compared} compared cell(s)"
    if counts.get("unmatched", 0):
        text += (
            f"; {int(counts['unmatched'])} baseline cell(s) with no run of their configuration "
            "(not checked)"
        )
    if counts.get("new", 0):
        text += f"; {int(counts['new'])} new"
    return text + "."


def regression_lines(deltas: pd.DataFrame) -> list[str]:
    """One line per regressed cell, naming it: 'dpfpl ... local_acc: 71.20 -> 60.10 (-11.10 pp,
    allowed 2.00)'."""
    out = []
    for _, row in regressions(deltas).iterrows():
        out.append(
            f"{cell_label(row)}: {_pp(row['baseline'])} -> {_pp(row['current'])} "
            f"({_pp(row['delta'], signed=True)} pp, allowed {_pp(row['allowed'])}; "
            f"status {row['current_status']})"
        )
    return out


@dataclass(frozen=True)
class Rerun:
    """One configuration of a baseline to run again: its resolved configuration (as the
    leaderboard recorded it), the eps values and the seeds of the chosen cells."""

    config: dict[str, Any]
    eps: tuple[str, ...]
    seeds: tuple[int, ...]


def select_cells(
    baseline: pd.DataFrame,
    *,
    methods: list[str] | None = None,
    eps: list[str] | None = None,
) -> pd.DataFrame:
    """The baseline rows of the chosen methods and eps values (all when None); UsageError when
    a name or value is not in the baseline."""
    chosen = baseline
    for column, flag, wanted in (("method", "--methods", methods), ("eps", "--eps", eps)):
        if wanted is None:
            continue
        wanted = [normalize_eps(w) if column == "eps" else w for w in wanted]
        known = list(dict.fromkeys(baseline[column]))
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise UsageError(
                f"{flag} {','.join(unknown)}: not in the baseline; it has {', '.join(known)}"
            )
        chosen = chosen[chosen[column].isin(wanted)]
    return chosen


def rerun_plan(cells: pd.DataFrame, seeds: list[int] | None = None) -> list[Rerun]:
    """What to run so that every chosen baseline cell has runs of its own configuration: one
    `Rerun` per config_hash, with the cells' eps values and the seeds the baseline ran (or
    `seeds`, a subset). UsageError when the baseline did not record a cell's configuration."""
    import json

    plans = []
    for config_hash, part in cells.groupby("config_hash", sort=False):
        text = part["config"].iloc[0]
        if not isinstance(text, str) or not text:
            raise UsageError(
                f"the baseline does not record the configuration of {cell_label(part.iloc[0])} "
                f"(config {config_hash}): regenerate it with `fpl-bench leaderboard --runs DIR`, "
                "or give --runs DIR of finished runs"
            )
        ran = sorted({int(x) for text in part["seeds"] for x in str(text).split(",") if x})
        if seeds is not None:
            missing = sorted(set(seeds) - set(ran))
            if missing:
                raise UsageError(
                    f"--seeds {','.join(map(str, missing))}: the baseline ran seeds "
                    f"{','.join(map(str, ran))}"
                )
            ran = sorted(seeds)
        plans.append(
            Rerun(
                config=json.loads(text),
                eps=tuple(sorted_eps(part["eps"])),
                seeds=tuple(ran),
            )
        )
    return plans
