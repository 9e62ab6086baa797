"""Run stores -> one records frame (the columns of `records.RESULT_COLUMNS`).

Two stores hold the same records:

- a folder with `results.csv` (what `fpl-bench run --out DIR` writes), read by
  `records.read_results`;
- an MLflow tracking URI, one MLflow run per record, whose tags, params and metrics mirror the
  columns: metrics `final/<metric>`, tags `method`, `dataset`, `eps`, `seed`, `protocol`, `trust`,
  `status`, the rest as params (or metrics). `mlflow_run_id` is the run's id.

MLflow runs are read with `MlflowClient(tracking_uri=...).search_runs`, not `mlflow.search_runs`:
the latter reads the process-wide tracking URI, and `mlflow.set_tracking_uri` also sets the
`MLFLOW_TRACKING_URI` environment variable, which `fpl_bench.tracking` honours; a report must not
redirect later runs of the same process.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd

from fpl_bench.errors import UsageError
from fpl_bench.jobs import sqlite_problem
from fpl_bench.report.records import (
    METRIC_COLUMNS,
    RESULT_COLUMNS,
    check_values,
    missing_columns,
    normalize_records,
    order_columns,
    read_results,
    with_later_columns,
)

RESULTS_FILE = "results.csv"
TRACKING_SCHEMES: tuple[str, ...] = (
    "sqlite",
    "postgresql",
    "mysql",
    "mssql",
    "http",
    "https",
    "databricks",
)
MLFLOW_STATUS = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "failed"}


def results_path(runs: Path) -> Path:
    """`runs/results.csv` for a folder; `runs` itself when it names a .csv file."""
    runs = Path(runs)
    return runs if runs.suffix == ".csv" and not runs.is_dir() else runs / RESULTS_FILE


def _csv_header(path: Path) -> list[str] | None:
    """The first row of a CSV file; None when it cannot be read as text (read_results says why)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def load_results_dir(runs: Path) -> pd.DataFrame:
    """The records in `runs/results.csv`; UsageError when missing, malformed or empty."""
    path = results_path(runs)
    if Path(runs).is_file() and path != Path(runs):
        raise UsageError(
            f"--runs {runs} is a file, not a run folder; give the folder `fpl-bench run --out` "
            f"wrote (it holds {RESULTS_FILE}) or that {RESULTS_FILE} itself"
        )
    header = _csv_header(path) if path == Path(runs) and path.is_file() else None
    if header is not None and not {"seed", "status"} <= set(header):
        raise UsageError(
            f"--runs {runs} is a CSV file but not a results file (no seed and status columns; "
            f"a leaderboard CSV?); give a run folder or its {RESULTS_FILE}"
        )
    if not path.is_file():
        where = f"{runs} has no {RESULTS_FILE}" if Path(runs).is_dir() else f"{path} not found"
        raise UsageError(f"{where}; run `fpl-bench run --out {runs}` first or pass --runs DIR")
    frame = read_results(path)
    if frame.empty:
        raise UsageError(f"{path} holds no runs (header only); run `fpl-bench run` first")
    return frame


def load_configs(runs: Path | None) -> dict[str, dict[str, Any]]:
    """{config hash: resolved configuration} from a run folder's configs/ (written by
    `fpl-bench run`); empty for a store without them (a tracking URI, an older folder)."""
    import json

    if runs is None:
        return {}
    folder = Path(runs)
    folder = folder.parent if folder.suffix == ".csv" else folder
    configs = {}
    for path in sorted((folder / "configs").glob("*.json")):
        try:
            configs[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a damaged file only loses the rerun of its cells
    return configs


def check_tracking_uri(uri: str) -> None:
    """UsageError for a URI MLflow cannot read here: unknown scheme, the file store, or an
    `sqlite:///` database file that does not exist (MLflow would create an empty one)."""
    scheme = urlparse(uri).scheme.split("+", 1)[0].lower()
    if scheme == "file" or not scheme:
        raise UsageError(
            f"--tracking-uri {uri}: the MLflow file store is not supported (MLflow >= 3.13 "
            "refuses it); use sqlite:///DIR/mlflow.db or a server URL"
        )
    if scheme not in TRACKING_SCHEMES:
        raise UsageError(
            f"--tracking-uri {uri}: unknown storage scheme {scheme!r}; "
            f"known: {', '.join(TRACKING_SCHEMES)}"
        )
    if scheme == "sqlite":
        db = uri.split(":///", 1)[1] if ":///" in uri else ""
        if not db or not Path(db).is_file():
            raise UsageError(f"--tracking-uri {uri}: database file {db or '(none)'} not found")
        problem = sqlite_problem(Path(db))
        if problem is not None:
            raise UsageError(f"--tracking-uri {uri}: {db} {problem}")


def _first(*values: Any) -> Any:
    """The first value that is not None."""
    return next((v for v in values if v is not None), None)


def mlflow_record(
    run_id: str,
    run_status: str,
    tags: dict[str, str],
    params: dict[str, str],
    metrics: dict[str, float],
) -> dict[str, Any] | None:
    """One record from one MLflow run's parts; None for a run still in progress.

    Each column comes from the first of: tag `c`, param `c`, metric `final/c`, metric `c`,
    param `privacy.c` (the ledger as `fpl_bench.experiment` logs it). A column found nowhere is
    left out, so the caller can name it.
    """
    row: dict[str, Any] = {}
    for column in RESULT_COLUMNS:
        value = _first(
            tags.get(column),
            params.get(column),
            metrics.get(f"final/{column}"),
            metrics.get(column),
            params.get(f"privacy.{column}"),
        )
        if value is not None:
            row[column] = value
    row.setdefault("mlflow_run_id", run_id)
    if "status" not in row:
        if run_status not in MLFLOW_STATUS:
            return None
        row["status"] = MLFLOW_STATUS[run_status]
    for metric in METRIC_COLUMNS:
        row.setdefault(metric, float("nan"))
    return row


def search_mlflow(uri: str, experiment: str) -> list[dict[str, Any]]:
    """Records of every run of `experiment` at `uri` (all pages), via MlflowClient."""
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    rows: list[dict[str, Any]] = []
    token = None
    while True:
        page = client.search_runs([found.experiment_id], max_results=1000, page_token=token)
        for run in page:
            row = mlflow_record(
                run.info.run_id,
                run.info.status,
                dict(run.data.tags),
                dict(run.data.params),
                dict(run.data.metrics),
            )
            if row is not None:
                rows.append(row)
        token = page.token
        if not token:
            return rows


def load_tracking(uri: str, experiment: str | None = None) -> pd.DataFrame:
    """The records of the MLflow runs at `uri` (experiment `fpl-bench` by default)."""
    from fpl_bench.tracking import EXPERIMENT

    check_tracking_uri(uri)
    name = experiment or EXPERIMENT
    rows = search_mlflow(uri, name)
    if not rows:
        raise UsageError(f"--tracking-uri {uri}: experiment {name!r} holds no finished runs")
    frame = pd.DataFrame(rows)
    missing = missing_columns(frame.columns)
    if missing:
        raise UsageError(
            f"--tracking-uri {uri}: runs lack the results columns {', '.join(missing)} "
            "(logged by an older fpl-bench?)"
        )
    frame = normalize_records(with_later_columns(frame))
    check_values(frame, uri)
    return order_columns(frame)


def load_records(runs: Path | None, tracking_uri: str | None) -> tuple[pd.DataFrame, str]:
    """Records from one store and a label naming it: `--tracking-uri` when given, else the
    `--runs` folder. UsageError when both are given."""
    if runs is not None and tracking_uri is not None:
        raise UsageError("give --runs DIR or --tracking-uri URI, not both")
    if tracking_uri is not None:
        return load_tracking(tracking_uri), tracking_uri
    folder = Path(runs) if runs is not None else Path("runs/default")
    return load_results_dir(folder), str(results_path(folder))
