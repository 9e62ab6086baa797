"""The workers: `run_worker` opens the job's studies and takes trials, under the storage's
lock, until each study's budget is spent (`work_on_study`); `tune` runs one worker in this
process or several worker processes (`_worker_main`) forked from a warm fork server."""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import optuna
from optuna.trial import FrozenTrial

from fpl_bench.catalog import MethodChoice, remember_cards
from fpl_bench.errors import UsageError
from fpl_bench.parallel import TUNE_WORKER_MODULES, adopt_parent, warm_workers, worker_context
from fpl_bench.process import configure_process
from fpl_bench.tune.logger import EXPERIMENT, Log, TrialLogger, summary_line
from fpl_bench.tune.objective import Objective, Workbench
from fpl_bench.tune.space import SearchParam, search_space
from fpl_bench.tune.storage import StudyLock, check_storage, open_storage
from fpl_bench.tune.study import TuneJob, open_study, tally

MAX_RETRY = 2  # a stale trial is retried at most this many times


@dataclass
class StudyRun:
    """A worker's handle on one study while it works on it."""

    study: optuna.Study
    choice: MethodChoice
    eps: float | None
    params: list[SearchParam]


def run_worker(job: TuneJob, slot: int = 0, log: Log = print) -> list[str]:
    """One worker: open every study of the job, then take trials until each study's budget is
    spent and none of its trials is still running (a trial of a dead worker is failed by the
    heartbeat and its retry taken). Returns the studies' summary lines."""
    from fpl_bench.prepare import prepare
    from fpl_bench.tracking import Tracker

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    remember_cards(job.spec.methods)  # a worker process: the job's method card files
    lock = StudyLock(job.storage)
    try:
        with lock:
            logger = TrialLogger(Tracker(job.spec.out, experiment=EXPERIMENT), job.metric, log)
            storage = open_storage(
                job.storage,
                heartbeat_interval=job.heartbeat_interval,
                on_stale=_stale_callback(logger),
            )
            studies = [_open(job, storage, logger, choice, eps) for choice, eps in job.cells()]
        bench = Workbench(prepare(job.spec, log=log))
        _work(job, studies, bench, lock, logger)
        with lock:
            lines = [_summary(job, s, logger) for s in studies]
    finally:
        lock.close()
    return lines


def _open(
    job: TuneJob, storage: Any, logger: TrialLogger, choice: MethodChoice, eps: float | None
) -> StudyRun:
    study = open_study(job, storage, choice, eps)
    params = search_space(choice.label)
    config = {**study.user_attrs["fpl.config"], "trials": job.trials, "storage": job.storage.shown}
    config.pop("search", None)
    logger.open_parent(study.study_name, config)
    return StudyRun(study, choice, eps, params)


def _stale_callback(logger: TrialLogger) -> Callable[[optuna.Study, FrozenTrial], None]:
    """Log a heartbeat-failed trial, then queue its retry (at most MAX_RETRY times)."""
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)

    def on_stale(study: optuna.Study, trial: FrozenTrial) -> None:
        if study.study_name in logger.parents:
            logger(study, trial)
        retry(study, trial)

    return on_stale


def _work(
    job: TuneJob, studies: list[StudyRun], bench: Workbench, lock: StudyLock, logger: TrialLogger
) -> None:
    """Round-robin over the studies until each is done; sleep a heartbeat interval while only
    other workers' trials are left running."""
    deadline = None if job.timeout is None else time.monotonic() + job.timeout
    pending = list(studies)
    while pending:
        for run in list(pending):
            if work_on_study(job, run, bench, lock, logger, deadline) == "done":
                pending.remove(run)
        if deadline is not None and time.monotonic() >= deadline:
            logger.log(f"--timeout {job.timeout:g} s reached: no new trials started")
            return
        if pending:
            time.sleep(job.heartbeat_interval)


def work_on_study(
    job: TuneJob,
    run: StudyRun,
    bench: Workbench,
    lock: StudyLock,
    logger: TrialLogger,
    deadline: float | None,
) -> Literal["done", "waiting"]:
    """Take trials of one study while it has any to give: 'done' when its budget is spent and
    no trial runs (or the storage cannot tell a dead worker: no heartbeat), else 'waiting'."""
    from fpl_bench.driver import Diverged

    objective = Objective(job, bench, run.choice, run.eps, run.params, lock)
    heartbeat = job.storage.kind != "journal"  # RDB storages record heartbeats
    while deadline is None or time.monotonic() < deadline:
        lock.acquire()
        try:
            optuna.storages.fail_stale_trials(run.study)
            count = tally(run.study)
            if not count.claimable(job.trials):
                return "waiting" if heartbeat and count.running else "done"
            run.study.optimize(objective, n_trials=1, catch=(Diverged,), callbacks=[logger])
        finally:
            lock.release()
    return "waiting"


def _summary(job: TuneJob, run: StudyRun, logger: TrialLogger) -> str:
    logger.close_parent(run.study, tally(run.study), job.trials)
    return summary_line(run.study, job.metric)


def _worker_main(job: TuneJob, slot: int, env: dict[str, str], cwd: str) -> None:
    """Entry of a worker process: its lines prefixed with [wN]; a UsageError is one line.
    The process's settings are the worker's own (`process.configure_process`)."""
    adopt_parent(env, cwd)
    configure_process()

    def log(text: str) -> None:
        print(f"[w{slot}] {text}", flush=True)

    try:
        for line in run_worker(job, slot, log):
            log(line)
    except UsageError as err:
        print(f"fpl-bench: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def tune(job: TuneJob, log: Log = print) -> tuple[list[str], list[int]]:
    """Run the job: in this process for one worker, else in `job.workers` processes (forked
    from a fork server that imports torch, MLflow and Optuna while this process prepares,
    fpl_bench/parallel.py; started after this process has filled the feature cache and
    created the storage and MLflow tables, so that workers do not race to make them).
    Returns (summary lines, exit codes of workers that failed)."""
    check_storage(job.storage)
    if job.workers == 1:
        return run_worker(job, 0, log), []
    warm_workers(TUNE_WORKER_MODULES)
    from fpl_bench.prepare import prepare
    from fpl_bench.tracking import Tracker

    prepare(job.spec, log=log)
    with StudyLock(job.storage):
        Tracker(job.spec.out, experiment=EXPERIMENT)
        storage = open_storage(job.storage)
        for choice, eps in job.cells():
            optuna.create_study(
                storage=storage,
                study_name=job.name(choice, eps),
                direction="maximize",
                load_if_exists=True,
            )
    context = worker_context()
    parent = (dict(os.environ), os.getcwd())
    procs = [
        context.Process(target=_worker_main, args=(job, s, *parent)) for s in range(job.workers)
    ]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join()
    except KeyboardInterrupt:
        for proc in procs:
            proc.terminate()
        raise
    failed = [p.exitcode for p in procs if p.exitcode]
    return study_summaries(job), failed


def study_summaries(job: TuneJob) -> list[str]:
    """One line per study of the job, read from the storage."""
    storage = open_storage(job.storage)
    return [
        summary_line(optuna.load_study(study_name=job.name(c, e), storage=storage), job.metric)
        for c, e in job.cells()
    ]
