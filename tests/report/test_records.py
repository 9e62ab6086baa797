"""records: the results schema, strict reading, upsert by key."""

import pandas as pd
import pytest

from fpl_bench.errors import UsageError
from fpl_bench.report.records import (
    KEY_COLUMNS,
    PROTOCOL_METRICS,
    RESULT_COLUMNS,
    normalize_eps,
    protocol_metrics,
    read_results,
    sorted_eps,
    upsert_results,
    write_results,
)
from tests.report.conftest import make_records, record


def test_schema_groups_are_disjoint_and_complete():
    assert len(set(RESULT_COLUMNS)) == len(RESULT_COLUMNS)
    assert set(KEY_COLUMNS) <= set(RESULT_COLUMNS)
    assert {"status", "local_acc", "hm", "eps_spent", "tuned", "mlflow_run_id"} <= set(
        RESULT_COLUMNS
    )
    assert protocol_metrics("personalized") == ("local_acc", "neighbor_acc")
    assert protocol_metrics("base2novel")[-1] == "hm"


def test_protocol_metrics_agree_with_evaluation():
    evaluate = pytest.importorskip("fpl_bench.evaluate")
    core = getattr(evaluate, "PROTOCOL_METRICS", None)
    if core is None:
        pytest.skip("fpl_bench.evaluate no longer defines PROTOCOL_METRICS")
    assert {k: tuple(v) for k, v in core.items()} == PROTOCOL_METRICS


def test_eps_normalised_and_sorted_in_table_order():
    assert [normalize_eps(v) for v in (None, "None", float("nan"), "0.50", 0.5, "1e-2")] == [
        "none",
        "none",
        "none",
        "0.5",
        "0.5",
        "0.01",
    ]
    assert sorted_eps(["0.01", "none", 0.4, "0.1"]) == ["none", "0.4", "0.1", "0.01"]


def test_upsert_replaces_rows_by_key_in_place_and_appends_new(records):
    replacement = pd.DataFrame(
        [record("promptfl", "none", 1, local_acc=0.99), record("dpfpl", "0.4", 2)]
    )
    replacement.loc[1, "seed"] = 7  # a new key
    replacement["eps"] = [None, 0.4]  # same eps, other spelling: still the same key
    merged = upsert_results(records, replacement)
    assert len(merged) == len(records) + 1
    assert merged.loc[1, "local_acc"] == 0.99 and merged.loc[1, "seed"] == 1
    assert merged.iloc[:-1]["mlflow_run_id"].tolist() == records["mlflow_run_id"].tolist()
    assert merged.iloc[-1]["seed"] == 7 and merged.iloc[-1]["eps"] == "0.4"
    assert list(merged.columns[: len(RESULT_COLUMNS)]) == list(RESULT_COLUMNS)


def test_upsert_last_new_row_of_a_key_wins_and_none_existing_is_fine():
    rows = pd.DataFrame(
        [record("dpfpl", "none", 0, local_acc=0.1), record("dpfpl", "none", 0, local_acc=0.2)]
    )
    merged = upsert_results(None, rows)
    assert len(merged) == 1 and merged.loc[0, "local_acc"] == 0.2


def test_upsert_other_config_hash_is_another_row(records):
    other = pd.DataFrame([record("dpfpl", "none", 0, config_hash="beef")])
    assert len(upsert_results(records, other)) == len(records) + 1


def test_read_results_round_trip(tmp_path, records):
    path = tmp_path / "results.csv"
    write_results(records, path)
    back = read_results(path)
    assert back["eps"].tolist() == records["eps"].tolist()
    assert back["seed"].tolist() == records["seed"].tolist()
    assert back["tuned"].dtype == bool
    write_results(back, path)
    header, first = path.read_text().splitlines()[:2]
    assert dict(zip(header.split(","), first.split(","), strict=True))["rounds"] == "20"
    assert back["local_acc"].tolist() == pytest.approx(records["local_acc"].tolist())


def test_read_results_refuses_missing_columns_naming_file_and_columns(tmp_path):
    path = tmp_path / "results.csv"
    make_records().drop(columns=["trust", "config_hash"]).to_csv(path, index=False)
    with pytest.raises(UsageError) as err:
        read_results(path)
    message = str(err.value)
    assert str(path) in message and "trust" in message and "config_hash" in message
    assert "\n" not in message


def test_read_results_keeps_extra_columns(tmp_path):
    path = tmp_path / "results.csv"
    make_records(extra_metric=0.5).to_csv(path, index=False)
    assert "extra_metric" in read_results(path).columns


@pytest.mark.parametrize(
    ("content", "needle"),
    [(None, "not found"), ("", "empty")],
)
def test_read_results_missing_or_empty_file(tmp_path, content, needle):
    path = tmp_path / "results.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=needle):
        read_results(path)


def test_read_results_refuses_unknown_status(tmp_path):
    path = tmp_path / "results.csv"
    make_records(status="exploded").to_csv(path, index=False)
    with pytest.raises(UsageError, match="'exploded'"):
        read_results(path)


def test_module_examples_hold():
    import doctest

    from fpl_bench.report import paper, records

    for module in (records, paper):
        assert doctest.testmod(module).failed == 0


def test_records_written_before_the_later_columns_still_read(tmp_path):
    from fpl_bench.report.records import LATER_COLUMNS
    from tests.report.conftest import make_records

    old = make_records().drop(columns=list(LATER_COLUMNS))
    old.to_csv(tmp_path / "results.csv", index=False)
    frame = read_results(tmp_path / "results.csv")
    assert len(frame) == 12 and not frame["secure_noise"].any()
    assert (frame["backbone"] == "").all() and frame["lr"].isna().all()
