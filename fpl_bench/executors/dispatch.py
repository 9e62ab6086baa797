"""The submitting side of `--executor ray|slurm`: the job's runs handed to a cluster, their
results gathered into OUT/results.csv and the job record, as a local job writes them.

    frame = run_on_cluster(specs, choice, log=print)

1. The tracking store (`--tracking-uri`, else $MLFLOW_TRACKING_URI, else OUT/mlflow.db) is
   checked and its experiment created before any worker opens it; OUT's lock is held (one
   submitting job per output folder) and the job recorded in OUT/jobs/.
2. Every run of the specs becomes a `cells.CellTask`. A cell with a done run in the tracking
   store, logged by any machine, is not submitted: its row comes from the store. (Local jobs
   skip only with --resume; a cluster job always skips, so resubmitting the same command is
   how a suite resumes.)
3. The executor runs the rest; each result is merged into OUT/results.csv as it arrives.
   Failed runs are listed at the end and fail the command; the others are kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from fpl_bench.errors import UsageError
from fpl_bench.executors.cells import CellResult, CellTask, cell_tasks
from fpl_bench.executors.options import ExecutorChoice
from fpl_bench.spec import ExperimentSpec


class Executor(Protocol):
    """Runs cells somewhere; calls `on_result` in this process as each one ends."""

    def run(
        self,
        tasks: Sequence[CellTask],
        on_result: Callable[[CellTask, CellResult], None],
        log: Callable[[str], None],
    ) -> None: ...


def make_executor(choice: ExecutorChoice, out: Path) -> Executor:
    """The executor `--executor` names (imported only when chosen: Ray and submitit are
    optional extras)."""
    if choice.name == "ray":
        from fpl_bench.executors.ray_backend import RayExecutor

        return RayExecutor(choice.config.ray)
    if choice.name == "slurm":
        from fpl_bench.executors.slurm_backend import SlurmExecutor

        return SlurmExecutor(choice.config.slurm, Path(out))
    raise ValueError(f"not a cluster executor: {choice.name}")


def job_tracking_uri(choice: ExecutorChoice, out: Path) -> str:
    """`--tracking-uri`, else the store a local job in OUT would use (tracking.tracking_uri)."""
    from fpl_bench.tracking import tracking_uri

    return choice.tracking_uri or tracking_uri(out)


def run_on_cluster(
    specs: Sequence[ExperimentSpec],
    choice: ExecutorChoice,
    *,
    log: Callable[[str], None] = print,
    executor: Executor | None = None,
) -> pd.DataFrame:
    """Run every cell of `specs` (one output folder) on the cluster; returns their rows in
    the order a local job lists them (module docstring)."""
    from fpl_bench.jobs import Job, check_tracking_uri, check_writable_folder, output_lock
    from fpl_bench.report.records import RESULT_COLUMNS, read_results
    from fpl_bench.run_records import save_configs
    from fpl_bench.tracking import Tracker

    if not specs:
        return pd.DataFrame(columns=list(RESULT_COLUMNS))
    out = Path(specs[0].out)
    if any(Path(s.out) != out for s in specs):
        raise ValueError("the specs of one cluster job share one output folder")
    check_writable_folder(out, "output folder")
    for spec in specs:
        check_writable_folder(Path(spec.cache_dir).expanduser(), "cache folder")
    uri = job_tracking_uri(choice, out)
    check_tracking_uri(uri)
    choice = ExecutorChoice(choice.name, choice.config, uri)
    choice.export_tracking_uri()
    csv_path = out / "results.csv"
    with output_lock(out):
        previous = read_results(csv_path) if csv_path.is_file() else None
        job = Job(out)
        try:
            Tracker(out)  # creates or migrates the store before any worker opens it
            for spec in specs:
                save_configs(spec, out)
            runner = executor or make_executor(choice, out)
            rows = _run_tasks(cell_tasks(specs, uri), runner, uri, previous, csv_path, job, log)
        except KeyboardInterrupt:
            job.end("interrupted")
            raise
        except BaseException as err:
            job.fail(err)
            raise
        job.end("finished")
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))


def _run_tasks(
    tasks: list[CellTask],
    runner: Executor,
    uri: str,
    previous: pd.DataFrame | None,
    csv_path: Path,
    job: Any,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    from fpl_bench.executors.records import done_keys
    from fpl_bench.report.records import RESULT_COLUMNS, upsert_results, write_results
    from fpl_bench.suite import format_seconds, key_id

    done = done_keys(uri)
    rows: dict[int, dict[str, Any]] = {}
    index_of = {id(task): i for i, task in enumerate(tasks)}
    pending = []
    for i, task in enumerate(tasks):
        found = done.get(key_id(task.key))
        if found is None:
            pending.append(task)
        else:
            rows[i] = found
    if rows:
        log(f"{len(rows)} of {len(tasks)} runs done before (tracking store {uri}); skipped")
    failed: list[tuple[CellTask, CellResult]] = []
    started = time.perf_counter()
    finished = 0

    def save() -> None:
        frame = pd.DataFrame([rows[i] for i in sorted(rows)], columns=list(RESULT_COLUMNS))
        write_results(upsert_results(previous, frame), csv_path)

    def on_result(task: CellTask, result: CellResult) -> None:
        nonlocal finished
        finished += 1
        elapsed = time.perf_counter() - started
        left = elapsed / finished * (len(pending) - finished)
        eta = f", about {format_seconds(left)} left" if finished < len(pending) else ""
        if result.row is None:
            failed.append((task, result))
            first = (result.error or "no result").strip().splitlines()[-1]
            log(f"[{finished}/{len(pending)}] {task.label}: failed on {result.host}: {first}")
            return
        rows[index_of[id(task)]] = result.row
        if result.outcome == "ran" and result.row.get("mlflow_run_id"):
            job.add_run(str(result.row["mlflow_run_id"]))
        save()
        log(f"[{finished}/{len(pending)}] {task.label}: {result.outcome} on {result.host}{eta}")

    if rows:
        save()
    runner.run(pending, on_result, log)
    if failed:
        _raise_failures(failed, len(tasks))
    return [rows[i] for i in sorted(rows)]


def _raise_failures(failed: list[tuple[CellTask, CellResult]], total: int) -> None:
    """Bad input on the workers (each error one line) is a UsageError; anything else is a
    bug, raised with the first worker's traceback."""
    task, first = failed[0]
    summary = f"{len(failed)} of {total} runs failed (first: {task.label})"
    if all(r.bad_input for _, r in failed):
        raise UsageError(f"{summary}: {first.error}; fix it and rerun the same command")
    raise RuntimeError(f"{summary}; rerun the same command to retry them:\n{first.error}")
