"""Regression check: a committed leaderboard CSV (the baseline) against fresh runs.

A comparison cell is (method, dataset, protocol, trust, eps, metric). For each baseline cell with
a number, delta = ours - baseline (fractions), and

    allowed drop = max(tolerance, k * baseline std over seeds)

A cell regresses when its drop exceeds the allowed one, or when the baseline's seeds all
finished and ours did not (a diverged or failed seed; no number at all counts as such).

`baseline_run_plan` + `run_baseline` are the path that reruns a baseline's cells (not wired to
the CLI yet: the spec of each run needs what the baseline CSV does not carry).

Bad input (UsageError, exit 2): a baseline that is not a leaderboard CSV, methods present on one
side only, baseline cells the runs do not have. Cells the baseline does not have are listed as
`new` and never fail the check.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fpl_bench.errors import UsageError
from fpl_bench.report.leaderboard import LEADERBOARD_COLUMNS
from fpl_bench.report.records import normalize_eps, sorted_eps

COMPARE_KEY: tuple[str, ...] = ("method", "dataset", "protocol", "trust", "eps", "metric")
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
)
DEFAULT_TOLERANCE = 0.02  # 2 percentage points
DEFAULT_K = 2.0
SHOW_MISSING = 3  # cells named in the error about missing cells


def read_leaderboard(path: Path | str) -> pd.DataFrame:
    """A leaderboard CSV written by `fpl-bench leaderboard`; UsageError, one line naming the
    file, when it is missing, empty, lacks columns or holds no rows."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(
            f"baseline {path} not found; write one with `fpl-bench leaderboard --out DIR --name NAME`"
        )
    try:
        frame = pd.read_csv(path, dtype={"eps": str})
    except pd.errors.EmptyDataError:
        raise UsageError(f"baseline {path} is empty") from None
    missing = [c for c in LEADERBOARD_COLUMNS if c not in frame.columns]
    if missing:
        raise UsageError(
            f"baseline {path} is not a leaderboard CSV: missing columns {', '.join(missing)}"
        )
    if frame.empty:
        raise UsageError(f"baseline {path} holds no cells (header only)")
    frame["eps"] = frame["eps"].map(normalize_eps)
    for column in ("mean", "std"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def check_methods(baseline: pd.DataFrame, current: pd.DataFrame, baseline_name: str) -> None:
    """UsageError when a method appears in only one of baseline and runs."""
    ours, theirs = set(current["method"]), set(baseline["method"])
    only_baseline, only_runs = sorted(theirs - ours), sorted(ours - theirs)
    if only_baseline:
        raise UsageError(
            f"baseline {baseline_name} has methods the runs lack: {', '.join(only_baseline)} "
            f"(runs have: {', '.join(sorted(ours))})"
        )
    if only_runs:
        raise UsageError(
            f"runs have methods the baseline {baseline_name} lacks: {', '.join(only_runs)} "
            "(regenerate the baseline with `fpl-bench leaderboard`)"
        )


def cell_label(row: pd.Series) -> str:
    """'dpfpl synthetic base2novel server eps=0.5 local_acc'."""
    return " ".join(str(row[c]) if c != "eps" else f"eps={row[c]}" for c in COMPARE_KEY)


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
) -> pd.DataFrame:
    """Deltas per cell (`DELTA_COLUMNS`) in baseline order, then the cells new in `current`.

    `baseline` and `current` are leaderboards (`leaderboard.summarize` / `read_leaderboard`).
    """
    check_methods(baseline, current, baseline_name)
    key = list(COMPARE_KEY)
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
    missing = joined[joined["_merge"] == "left_only"]
    if not missing.empty:
        named = "; ".join(cell_label(r) for _, r in missing.head(SHOW_MISSING).iterrows())
        raise UsageError(
            f"runs lack {len(missing)} cell(s) of baseline {baseline_name}: {named}"
            + (" ..." if len(missing) > SHOW_MISSING else "")
        )
    rows = []
    for _, row in joined.iterrows():
        new = row["_merge"] == "right_only"
        base = math.nan if new else float(row["mean_b"])
        base_std = math.nan if new else float(row["std_b"])
        ours = float(row["mean_c"])
        allowed = thresholds.allowed(base_std)
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
        "| method | dataset | protocol | trust | eps | metric | baseline | ours | delta "
        "| allowed | status | verdict |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for _, row in deltas.iterrows():
        mark = "**regression**" if row["verdict"] == "regression" else row["verdict"]
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
    bad = regressions(deltas)
    lines += ["", f"{len(bad)} regression(s) in {len(deltas)} cell(s)."]
    return "\n".join(lines) + "\n"


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
