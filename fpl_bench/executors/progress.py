"""One view of a suite's progress, from the tracking store every run logs to: cells done,
running, failed and to do, and an ETA (`fpl-bench run --suite NAME --progress`).

A cell is done when a run of its key ended finished or diverged, running while a run of its
key is RUNNING (a run whose process died before its first checkpoint shows as running until
its retry deletes it), failed when its runs ended otherwise, and to do when it has none. The
ETA is the median wall time of the done runs times the cells left, over the runs in progress
(at least one).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fpl_bench.executors.options import ExecutorChoice
from fpl_bench.executors.records import DONE_STATUSES


@dataclass(frozen=True)
class Progress:
    suite: str
    uri: str
    done: int
    running: int
    failed: int
    todo: int
    eta_s: float | None
    running_cells: tuple[str, ...] = ()
    failed_cells: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return self.done + self.running + self.failed + self.todo


def cell_states(runs: list[Mapping[str, Any]]) -> str:
    """The state of a cell from its runs' (MLflow status, tag status) pairs.

    >>> cell_states([{"status": "FAILED", "tag": "failed"}, {"status": "RUNNING", "tag": ""}])
    'running'
    """
    if any(r["tag"] in DONE_STATUSES and r["status"] != "RUNNING" for r in runs):
        return "done"
    if any(r["status"] == "RUNNING" for r in runs):
        return "running"
    return "failed" if runs else "todo"


def _runs_by_key(uri: str) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    """Every run of the store's experiment, as (status, tag, wall) by its key id."""
    from mlflow.tracking import MlflowClient

    from fpl_bench.report.records import KEY_COLUMNS
    from fpl_bench.suite import key_id
    from fpl_bench.tracking import EXPERIMENT

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(EXPERIMENT)
    runs: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    if found is None:
        return runs
    token = None
    while True:
        page = client.search_runs([found.experiment_id], max_results=1000, page_token=token)
        for run in page:
            tags = run.data.tags
            if not all(c in tags for c in KEY_COLUMNS):
                continue
            runs.setdefault(key_id(tags), []).append(
                {
                    "status": run.info.status,
                    "tag": tags.get("status", ""),
                    "wall": run.data.metrics.get("wall_s", math.nan),
                }
            )
        token = page.token
        if not token:
            return runs


def suite_progress(
    suite: Any,
    out: Path,
    cluster: ExecutorChoice | None,
    overrides: Mapping[str, Any] | None = None,
    only: Any = None,
) -> Progress:
    """The progress of `suite`'s cells (those `only` keeps) in the job's tracking store."""
    from fpl_bench.executors.dispatch import job_tracking_uri
    from fpl_bench.executors.options import executor_choice
    from fpl_bench.jobs import check_tracking_uri
    from fpl_bench.run_records import run_name
    from fpl_bench.suite import key_id, suite_cells

    cluster = cluster or executor_choice()
    uri = job_tracking_uri(cluster, Path(out))
    check_tracking_uri(uri)
    cells = suite_cells(suite, overrides=overrides, out=Path(out), only=only)
    runs = _runs_by_key(uri)
    states = {"done": 0, "running": 0, "failed": 0, "todo": 0}
    running, failed, walls = [], [], []
    for cell in cells:
        mine = runs.get(key_id(cell.key), [])
        state = cell_states(mine)
        states[state] += 1
        name = run_name(cell.key)
        if state == "running":
            running.append(name)
        elif state == "failed":
            failed.append(name)
        elif state == "done":
            walls += [r["wall"] for r in mine if math.isfinite(r["wall"])]
    left = states["running"] + states["todo"] + states["failed"]
    eta = None
    if walls and left:
        eta = statistics.median(walls) * left / max(states["running"], 1)
    elif not left:
        eta = 0.0
    return Progress(
        suite.name,
        uri,
        **states,
        eta_s=eta,
        running_cells=tuple(running),
        failed_cells=tuple(failed),
    )


def format_progress(progress: Progress) -> str:
    """A few lines: the counts and the ETA, then the cells running and failed."""
    from fpl_bench.suite import format_seconds

    eta = "unknown (no run done yet)" if progress.eta_s is None else format_seconds(progress.eta_s)
    lines = [
        f"suite {progress.suite}: {progress.done}/{progress.total} done, {progress.running} "
        f"running, {progress.failed} failed, {progress.todo} to do; ETA {eta}",
        f"tracking store: {progress.uri}",
    ]
    lines += [f"  running: {name}" for name in progress.running_cells]
    lines += [f"  failed:  {name}" for name in progress.failed_cells]
    return "\n".join(lines)
