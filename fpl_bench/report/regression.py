"""Regression check: a committed leaderboard CSV (the baseline) against fresh runs.

A comparison cell is (method, dataset, protocol, trust, eps, metric, config_hash): a baseline
cell is compared only with runs of the same configuration (the leaderboard records each cell's
`config_hash` and key fields). For each matched baseline cell with a number, delta = ours -
baseline (fractions), and

    allowed drop = max(tolerance, k * baseline std over seeds)

A cell regresses when its drop exceeds the allowed one, or when the baseline's seeds all
finished and ours did not (a diverged or failed seed; no number at all counts as such).

`baseline_run_plan` + `run_baseline` are the path that reruns a baseline's cells (not wired to
the CLI yet: the spec of each run needs what the baseline CSV does not carry).

A baseline cell with no run of its configuration is `unmatched` (said plainly, with the key
fields in which the runs' cell differs, e.g. rounds 20 against 10): it is not checked and never
a regression. Cells the baseline does not have are `new` and never fail the check either.

Bad input (UsageError, exit 2): a baseline that is not a leaderboard CSV (or one written before
leaderboards recorded configurations), and runs that match no baseline cell at all (nothing
would be checked).
"""

from __future__ import annotations

import math
from collections.abc import Callable
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


def read_leaderboard(path: Path | str) -> pd.DataFrame:
    """A leaderboard CSV written by `fpl-bench leaderboard`; UsageError, one line naming the
    file, when it is missing, empty, lacks columns or holds no rows."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(
            f"baseline {path} is a folder; give its leaderboard CSV, e.g. {path}/NAME.csv"
        )
    if not path.is_file():
        raise UsageError(
            f"baseline {path} not found; write one with `fpl-bench leaderboard --out DIR --name NAME`"
        )
    try:
        frame = pd.read_csv(path, dtype={"eps": str})
    except pd.errors.EmptyDataError:
        raise UsageError(f"baseline {path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        reason = " ".join(str(err).split())[:120]
        raise UsageError(f"baseline {path} is not a leaderboard CSV ({reason})") from None
    missing = [c for c in LEADERBOARD_COLUMNS if c not in frame.columns]
    if missing == ["config_hash", *SETUP_FIELDS, "setup_hash"] or (
        "mean" in frame.columns and "config_hash" in missing
    ):
        raise UsageError(
            f"baseline {path} records no configuration per cell (written by an older "
            "fpl-bench): regenerate it with `fpl-bench leaderboard --runs DIR` from its runs"
        )
    if missing:
        raise UsageError(
            f"baseline {path} is not a leaderboard CSV: missing columns {', '.join(missing)}"
        )
    if frame.empty:
        raise UsageError(f"baseline {path} holds no cells (header only)")
    frame["eps"] = frame["eps"].map(normalize_eps)
    for column in ("mean", "std"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    frame["config_hash"] = frame["config_hash"].astype(str)
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
class RunRequest:
    """One `fpl-bench run` the baseline needs: a (dataset, protocol, trust) with its methods,
    eps values and number of seeds (seeds 0..n-1)."""

    dataset: str
    protocol: str
    trust: str
    methods: tuple[str, ...]
    eps: tuple[str, ...]
    n_seeds: int


def baseline_run_plan(baseline: pd.DataFrame) -> list[RunRequest]:
    """What to run to reproduce the baseline's cells, one request per (dataset, protocol,
    trust). The lead wires this to `run_experiment`: build an ExperimentSpec per request (the
    baseline CSV does not carry rounds, shots, ... : take them from the spec that made it)."""
    plans = []
    for (dataset, protocol, trust), part in baseline.groupby(
        ["dataset", "protocol", "trust"], sort=False
    ):
        plans.append(
            RunRequest(
                dataset=str(dataset),
                protocol=str(protocol),
                trust=str(trust),
                methods=tuple(dict.fromkeys(part["method"])),
                eps=tuple(sorted_eps(part["eps"])),
                n_seeds=int(pd.to_numeric(part["n_runs"], errors="coerce").max()),
            )
        )
    return plans


def run_baseline(
    plan: list[RunRequest],
    out: Path,
    make_spec: Callable[[RunRequest, Path], Any],
    run: Callable[[Any], Any] | None = None,
) -> Path:
    """Run every request of `plan` into the folder `out`; returns the folder, whose
    results.csv `regress` then reads.

    make_spec(request, out) -> ExperimentSpec: the caller fills what the baseline does not
    record (backbone, rounds, shots, ...). run defaults to `fpl_bench.experiment.run_experiment`.
    """
    if run is None:
        from fpl_bench.experiment import run_experiment as run
    for request in plan:
        run(make_spec(request, Path(out)))
    return Path(out)
