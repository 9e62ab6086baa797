"""`fpl-bench tune --executor ray|slurm`: the study's `--workers` workers as Ray tasks or Slurm
jobs instead of processes on this machine. Each runs `tune.run_worker` (the loop a local worker
runs), so the studies' storage must be one every worker reaches: PostgreSQL for many machines
(`--storage postgresql://...`), or the journal file in a shared --out. A worker that dies
leaves its trial RUNNING until its heartbeat goes stale (RDB storages); the trial is then
failed and retried by a live worker, as on one machine. A pre-empted Slurm worker is requeued
and takes trials again; Ray retries a worker whose process died.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from fpl_bench.executors.options import ExecutorChoice


def _portable(job: Any) -> Any:
    """The job with absolute paths (a worker's working folder is not this one's)."""
    from fpl_bench.tune.storage import StorageTarget

    spec = job.spec
    update: dict[str, Any] = {
        "out": Path(spec.out).resolve(),
        "cache_dir": Path(spec.cache_dir).expanduser().resolve(),
    }
    if spec.data_root is not None:
        update["data_root"] = Path(spec.data_root).expanduser().resolve()
    storage = job.storage
    if storage.kind == "journal":
        storage = StorageTarget("journal", str(Path(storage.location).resolve()))
    elif storage.kind == "sqlite" and storage.location.startswith("sqlite:///"):
        path = Path(storage.location.removeprefix("sqlite:///")).resolve()
        storage = StorageTarget("sqlite", f"sqlite:///{path}")
    return replace(job, spec=spec.model_copy(update=update), storage=storage)


def tune_worker(job: Any, slot: int, tracking_uri: str) -> list[str]:
    """One tuning worker on a cluster node: `tune.run_worker`, logging to the job's tracking
    store; returns its studies' summary lines."""
    from fpl_bench.process import configure_process

    configure_process()
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    from fpl_bench.tune.workers import run_worker

    def log(text: str) -> None:
        print(f"[w{slot}] {text}", file=sys.stderr, flush=True)

    return run_worker(job, slot, log)


def _checkpointable_worker() -> Any:
    """A submitit job running one tuning worker, requeued as it is on pre-emption."""
    from fpl_bench.executors.slurm_backend import CheckpointableCall

    return CheckpointableCall(tune_worker)


def tune_on_cluster(
    job: Any, choice: ExecutorChoice, log: Callable[[str], None]
) -> tuple[list[str], list[int]]:
    """Run the job's workers on the cluster. Returns (the studies' summary lines, the slots
    of workers that failed), as `tune.tune` does."""
    import optuna

    from fpl_bench.executors.dispatch import job_tracking_uri
    from fpl_bench.jobs import check_tracking_uri
    from fpl_bench.tracking import Tracker
    from fpl_bench.tune import EXPERIMENT, StudyLock, check_storage, open_storage
    from fpl_bench.tune.workers import study_summaries

    job = _portable(job)
    check_storage(job.storage)
    out = Path(job.spec.out)
    uri = job_tracking_uri(choice, out)
    check_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    with StudyLock(job.storage):  # tables and studies made once, before any worker starts
        Tracker(out, experiment=EXPERIMENT)
        storage = open_storage(job.storage)
        for method, eps in job.cells():
            optuna.create_study(
                storage=storage,
                study_name=job.name(method, eps),
                direction="maximize",
                load_if_exists=True,
            )
    calls = [(job, slot, uri) for slot in range(job.workers)]
    failed: list[int] = []

    def on_done(index: int, value: Any, error: str | None) -> None:
        if error is not None:
            failed.append(index)
            log(f"[w{index}] failed: {error}")

    if choice.name == "ray":
        from fpl_bench.executors.ray_backend import RayExecutor

        RayExecutor(choice.config.ray).map(
            tune_worker,
            calls,
            device=job.spec.device,
            names=[f"tune-worker-{slot}" for slot in range(job.workers)],
            on_done=on_done,
            log=log,
            what="tuning workers",
        )
    else:
        from fpl_bench.executors.slurm_backend import SlurmExecutor

        SlurmExecutor(choice.config.slurm, out).map(
            _checkpointable_worker(),
            calls,
            device=job.spec.device,
            on_done=on_done,
            log=log,
            what=f"{job.workers} tuning workers",
        )
    return study_summaries(job), failed
