"""sources: results.csv folders and MLflow tracking URIs give the same records."""

import math

import pandas as pd
import pytest

from fpl_bench.errors import UsageError
from fpl_bench.report.leaderboard import summarize
from fpl_bench.report.records import METRIC_COLUMNS, RESULT_COLUMNS
from fpl_bench.report.sources import (
    check_tracking_uri,
    load_records,
    load_results_dir,
    mlflow_record,
)

TAGS = ("method", "dataset", "eps", "seed", "protocol", "trust", "status")


def log_runs(uri: str, records: pd.DataFrame) -> None:
    """One MLflow run per record: tags as listed, metrics final/<metric>, params the rest."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("fpl-bench")
    for _, row in records.iterrows():
        tags = {c: str(row[c]) for c in TAGS}
        run = client.create_run(experiment, tags=tags)
        params = [
            Param(c, str(row[c]))
            for c in RESULT_COLUMNS
            if c not in TAGS and c not in METRIC_COLUMNS and c != "mlflow_run_id"
        ]
        metrics = [
            Metric(f"final/{m}", float(row[m]), 0, 0)
            for m in METRIC_COLUMNS
            if not math.isnan(row[m])
        ]
        client.log_batch(run.info.run_id, metrics=metrics, params=params)
        client.set_terminated(run.info.run_id, status="FINISHED")


def test_mlflow_runs_give_the_same_leaderboard(tmp_path, records):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_runs(uri, records)
    from_mlflow, source = load_records(None, uri)
    assert source == uri and len(from_mlflow) == len(records)
    assert from_mlflow["mlflow_run_id"].str.len().gt(0).all()
    ours = summarize(from_mlflow).set_index(["method", "eps", "metric"]).sort_index()
    expected = summarize(records).set_index(["method", "eps", "metric"]).sort_index()
    pd.testing.assert_series_equal(ours["mean"], expected["mean"])
    assert ours.loc[("dpfpl", "0.4", "local_acc"), "status"] == "diverged"


def test_mlflow_record_takes_status_from_run_when_untagged():
    row = mlflow_record("r1", "FAILED", {"method": "coop"}, {}, {"final/local_acc": 0.5})
    assert row["status"] == "failed" and row["local_acc"] == 0.5 and row["mlflow_run_id"] == "r1"
    assert mlflow_record("r2", "RUNNING", {}, {}, {}) is None


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("ftp://host/db", "unknown storage scheme 'ftp'"),
        ("file:///tmp/mlruns", "file store is not supported"),
        ("sqlite:///does/not/exist.db", "not found"),
    ],
)
def test_bad_tracking_uri_one_line(uri, needle):
    with pytest.raises(UsageError, match=needle) as err:
        check_tracking_uri(uri)
    assert "\n" not in str(err.value)


def test_runs_and_tracking_uri_are_exclusive(tmp_path):
    with pytest.raises(UsageError, match="not both"):
        load_records(tmp_path, "sqlite:///x.db")


def test_empty_run_store_refused(tmp_path, records):
    records.iloc[:0].to_csv(tmp_path / "results.csv", index=False)
    with pytest.raises(UsageError, match="holds no runs"):
        load_results_dir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"has no results\.csv"):
        load_results_dir(tmp_path / "empty")
