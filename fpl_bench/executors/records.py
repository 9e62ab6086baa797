"""What the tracking server knows about a cell, read by its record key.

A run logged by `experiment.run_one` carries its key (`run_records.run_key`: method, learner,
scheme, dataset, protocol, trust, eps, seed, config hash) as MLflow tags, so any machine can ask
the one tracking server whether a cell is done, running or was abandoned:

done_record(tracker, key)     the row of a finished (or diverged) run of the key, or None
abandoned_runs(tracker, key)  its earlier attempts without a result and without a checkpoint
                              to continue (a process that died, an error, a pre-emption before
                              the first round): deleted (MLflow's soft delete) before the cell
                              runs again, so a cell is never recorded twice
done_keys(uri)                key ids of every done run in the store (what a submission skips)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fpl_bench.report.records import KEY_COLUMNS

DONE_STATUSES: tuple[str, ...] = ("finished", "diverged")  # as fpl_bench/suite.py counts them


def key_filter(key: Mapping[str, Any]) -> str:
    """An MLflow search filter matching the runs tagged with `key` (tags as `run_one` sets
    them: each value as `str`).

    >>> key_filter({"method": "coop", "seed": 0})
    "tags.`method` = 'coop' AND tags.`seed` = '0'"
    """
    parts = []
    for column, value in key.items():
        text = str(value).replace("'", "\\'")
        parts.append(f"tags.`{column}` = '{text}'")
    return " AND ".join(parts)


def runs_of_key(tracker: Any, key: Mapping[str, Any]) -> list[Any]:
    """The MLflow runs (not deleted) of the experiment tagged with `key`, oldest first."""
    from mlflow.entities import ViewType

    found = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=key_filter({c: key[c] for c in KEY_COLUMNS}),
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=1000,
        order_by=["attributes.start_time ASC"],
    )
    return list(found)


def done_record(tracker: Any, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The record (a results row, `report.sources.mlflow_record`) of a done run of `key`."""
    from fpl_bench.report.sources import mlflow_record

    for run in reversed(runs_of_key(tracker, key)):
        status = run.data.tags.get("status", "")
        if run.info.status in ("FINISHED", "FAILED") and status in DONE_STATUSES:
            return mlflow_record(
                run.info.run_id,
                run.info.status,
                dict(run.data.tags),
                dict(run.data.params),
                dict(run.data.metrics),
            )
    return None


def abandoned_runs(tracker: Any, key: Mapping[str, Any], keep: str | None) -> list[str]:
    """Ids of the key's earlier attempts other than `keep` (the run a checkpoint continues):
    runs left RUNNING by a process that died, and runs that ended without a result (failed,
    killed: an error, or a signal before the first checkpoint). Called under the cell's lock,
    just before the cell runs again: no live process runs it, and its new run supersedes them.

    >>> from types import SimpleNamespace as N
    >>> def run(i, status, tag=""):
    ...     return N(info=N(run_id=i, status=status), data=N(tags={"status": tag}))
    >>> found = [run("a", "RUNNING"), run("b", "FAILED", "failed"), run("c", "RUNNING")]
    >>> tracker = N(client=N(search_runs=lambda *a, **k: found), experiment_id="0")
    >>> key = dict.fromkeys(KEY_COLUMNS, "x")
    >>> abandoned_runs(tracker, key, keep="c")
    ['a', 'b']
    """
    return [
        run.info.run_id
        for run in runs_of_key(tracker, key)
        if run.info.run_id != keep and run.data.tags.get("status", "") not in DONE_STATUSES
    ]


def done_keys(uri: str) -> dict[tuple[str, ...], dict[str, Any]]:
    """Every done record in the store at `uri` by its key id (`suite.key_id`)."""
    from fpl_bench.report.sources import search_mlflow
    from fpl_bench.suite import key_id
    from fpl_bench.tracking import EXPERIMENT

    done = {}
    for row in search_mlflow(uri, EXPERIMENT):
        if row.get("status") in DONE_STATUSES and all(c in row for c in KEY_COLUMNS):
            done[key_id(row)] = row
    return done
