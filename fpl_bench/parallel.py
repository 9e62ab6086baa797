"""The runs of a job in parallel worker processes (`--workers`), one run per worker at a time.

A run is sequential work of small tensor ops (a few MFLOP each on the embedded model): a second
intra-op thread adds little, a second run in its own process nearly doubles the job's rate. So
on CPU a large job spreads its runs over `usable cores / threads per run` workers (`job_workers`);
a small one (the tests, a smoke run) stays in-process, where starting workers would cost more
than it saves, and CUDA jobs keep one process (one device).

Parent and workers, as Flower splits server and client:
- the parent prepares the job once (data, features into the on-disk cache, partitions), hands
  out run indices through a queue, and alone writes results.csv, the job record and the log;
- a worker (forked from a fork server, or spawned: no state of the parent's either way)
  prepares the same spec from the warm cache, then runs `experiment.run_one` for each index it
  takes and sends back the row. Its MLflow run, per-round
  metrics and checkpoints are written by the worker itself (MLflow's store takes concurrent
  writers; a checkpoint is per run).
Start-up: a fresh interpreter spends ~10 s importing torch, open_clip and MLflow before it can
run. `warm_workers`, called before the parent imports torch (the CLI's `run`, as soon as the
job's flags are read) and again before it prepares the job (`run_experiment`), starts the fork
server that multiprocessing's "forkserver" method forks workers from, and has it import those
modules while the parent is busy with its own imports and data; each worker is then a fork of
it that starts running within a second or two (`fpl-bench tune --workers` starts its workers
the same way). The fork server is a fresh interpreter: nothing of the parent's state, threads
or open files reaches a worker, which takes the parent's environment and working directory at
the job's start (`adopt_parent`); where there is no forkserver method, workers are spawned.
Process settings (fpl_bench/process.py) are the workers' own: the fork server inherits
`process.ENVIRONMENT` (OpenMP reads it when the server imports torch), which the parent's
os.environ holds, where unset, only while the server starts; each worker calls
`configure_process` at its start.
Every run is seeded by its own (seed, round, client, step) streams, so the rows are the same
whichever worker runs them, and the same as in one process (tests/test_parallel.py).

Stopping: workers ignore SIGINT (Ctrl-C reaches the whole process group); the parent, on
KeyboardInterrupt (Ctrl-C, or SIGTERM turned into one by the CLI), sends SIGTERM to each worker,
whose handler raises KeyboardInterrupt inside its run (`run_one` marks the MLflow run KILLED,
its last checkpoint stays for --resume), waits for them and re-raises. A run's error is sent
back and raised in the parent after the other workers are stopped.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from fpl_bench.process import ENVIRONMENT, configure_process

__all__ = [
    "PARALLEL_JOB_COST",
    "adopt_parent",
    "available_memory",
    "job_workers",
    "run_parallel",
    "warm_workers",
    "warm_workers_if_needed",
    "worker_context",
]

# Below this cost of training for the whole job (estimates.job_cost: the FLOPs of CoOp runs that
# take as long), workers are not started (spawning one and preparing its data costs a few
# seconds; 2e12 FLOPs is a minute or more of runs).
PARALLEL_JOB_COST = 2e12

Cell = tuple[int, float | None, Any]  # (seed, eps, MethodChoice)

# What a worker imports before its first run; the fork server imports them once (`warm_workers`).
WORKER_MODULES = (
    "torch",
    "open_clip",
    "mlflow.tracking",
    "mlflow.store.tracking.sqlalchemy_store",
    "fpl_bench.experiment",
    "fpl_bench.tracking",
)

TUNE_WORKER_MODULES = (*WORKER_MODULES, "optuna")  # and a tune worker's (fpl_bench/tune/)


def worker_context() -> Any:
    """The multiprocessing context workers start from: forkserver where the platform has it
    (Linux, macOS), else spawn. Neither gives a worker any of the parent's state."""
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    return mp.get_context(method)


def warm_workers(modules: Sequence[str] = WORKER_MODULES) -> bool:
    """Start the fork server now, importing `modules` in its own process, so that it is
    ready (or nearly) when `run_parallel` (or `tune.tune`) asks it for workers. Returns whether
    one is running. Idempotent: the server lives as long as this process and serves every
    later job (the modules of the first call are the ones imported)."""
    ctx = worker_context()
    if ctx.get_start_method() != "forkserver":
        return False
    from multiprocessing import forkserver

    ctx.set_forkserver_preload(list(modules))  # no effect once the server runs
    with _environment(ENVIRONMENT):  # read by OpenMP when the server imports torch
        forkserver.ensure_running()
    return True


@contextmanager
def _environment(defaults: Mapping[str, str]) -> Iterator[None]:
    """`defaults` in os.environ where unset while the block runs, so that a process started
    in it inherits them; os.environ holds what it held before once the block ends."""
    added = [name for name in defaults if name not in os.environ]
    for name in added:
        os.environ[name] = defaults[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def warm_workers_if_needed(*, workers: int | None, device: str, runs: int) -> bool:
    """`warm_workers` for a job that may use workers: not on CUDA (one process), more than
    one run, --workers not 1. Returns whether a fork server is running."""
    if workers == 1 or runs < 2 or device == "cuda":
        return False
    return warm_workers()


def job_workers(
    *,
    requested: int | None,
    threads: int | None,
    device_type: str,
    n_runs: int,
    job_cost: float,
    worker_bytes: float = 0.0,
) -> int:
    """How many worker processes a job uses: `requested` (capped at the runs), else 1 on CUDA,
    for a single run or below PARALLEL_JOB_COST, else usable cores / threads per run, and no
    more than fit in half the available memory at `worker_bytes` each (its data and model).

    >>> job_workers(requested=None, threads=None, device_type="cpu", n_runs=9, job_cost=1e13) > 0
    True
    >>> job_workers(requested=None, threads=None, device_type="cuda", n_runs=9, job_cost=1e15)
    1
    """
    if requested is not None:
        return max(1, min(requested, n_runs))
    if device_type != "cpu" or n_runs < 2 or job_cost < PARALLEL_JOB_COST:
        return 1
    fit = int(0.5 * available_memory() / worker_bytes) if worker_bytes > 0 else n_runs
    return max(1, min(n_runs, usable_cores() // (threads or 1), fit))


def available_memory() -> float:
    """Bytes of memory available to new processes (Linux MemAvailable; inf where unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def usable_cores() -> int:
    """`compute.usable_cores`, imported when first needed: this module is imported (for
    `warm_workers`) before torch is."""
    from fpl_bench.compute import usable_cores as cores

    return cores()


def threads_per_worker(workers: int, threads: int | None) -> int:
    """Intra-op threads of each worker: as asked, else the usable cores shared out (>= 1)."""
    return threads or max(1, usable_cores() // workers)


# ----------------------------------------------------------------------------- worker side


_stopping = False  # set by SIGTERM in a worker


def _stop_run(signum: int, frame: Any) -> None:
    """SIGTERM in a worker: stop the run now, and again at its next round should this
    KeyboardInterrupt land where Python swallows it (a garbage-collection callback)."""
    global _stopping
    _stopping = True
    raise KeyboardInterrupt


def _quiet_stop(unraisable: Any) -> None:
    """`sys.unraisablehook` of a worker: a stop swallowed in a callback is re-raised at the
    run's next round (`_stopping`), so it is not printed as an error."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)


def _watch_parent(interval: float = 1.0) -> None:
    """SIGTERM this worker once its parent is gone (killed without stopping us): its run is
    then marked KILLED like any stopped run, and nothing runs on unlocked output."""
    parent = mp.parent_process()
    while parent is not None and parent.is_alive():
        time.sleep(interval)
    os.kill(os.getpid(), signal.SIGTERM)


def adopt_parent(env: dict[str, str], cwd: str) -> None:
    """A worker takes the parent's environment and working directory as they are when the job
    starts workers (a fork server's copies date from the server's start)."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)


def _worker_main(
    spec: Any, cells: Sequence[Cell], tasks: Any, results: Any, env: dict[str, str], cwd: str
) -> None:
    """A worker: prepare the spec, then run the cells whose indices arrive on `tasks`.
    `env` and `cwd` are the parent's now (`adopt_parent`); the process's settings are this
    worker's own (`process.configure_process`, before it imports torch where it has not yet)."""
    adopt_parent(env, cwd)
    configure_process()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_run)
    sys.unraisablehook = _quiet_stop
    threading.Thread(target=_watch_parent, daemon=True).start()
    from fpl_bench.experiment import run_one
    from fpl_bench.prepare import federation, prepare
    from fpl_bench.tracking import Tracker

    index = None
    try:
        prep = prepare(spec, lambda text: None)
        tracker = Tracker(spec.out)
        feds: dict[int, Any] = {}
        while (index := tasks.get()) is not None:
            seed, eps, choice = cells[index]
            if seed not in feds:
                feds = {seed: federation(prep, seed)}
            log = lambda text: results.put(("log", index, text))  # noqa: E731

            def progress(rounds: int, index: int = index) -> None:
                results.put(("round", index, rounds))
                if _stopping:  # a SIGTERM whose KeyboardInterrupt was swallowed
                    raise KeyboardInterrupt

            row = run_one(prep, feds[seed], choice, eps, seed, tracker, log, progress=progress)
            results.put(("row", index, row))
    except KeyboardInterrupt:
        results.put(("killed", index, None))
    except BaseException as err:  # sent to the parent, raised there
        results.put(("error", index, _portable(err)))


def _portable(err: BaseException) -> BaseException:
    """What the parent raises for a worker's error: a UsageError as its one line (exit 2, as
    in one process), anything else as a RuntimeError holding the worker's traceback (a bug
    keeps its traceback; the worker's frames are not the parent's)."""
    from fpl_bench.errors import UsageError

    if isinstance(err, UsageError):
        return UsageError(str(err))
    text = "".join(traceback.format_exception(err)).rstrip()
    return RuntimeError(f"a worker process failed:\n{text}")


# ----------------------------------------------------------------------------- parent side


def run_parallel(
    spec: Any,
    cells: Sequence[Cell],
    pending: Sequence[int],
    *,
    workers: int,
    on_row: Callable[[int, dict[str, Any]], None],
    log: Callable[[str], None],
    on_round: Callable[[int, int], None] | None = None,
) -> None:
    """Run cells[i] for i in `pending` on `workers` processes (`worker_context`);
    `on_row(i, row)` in the parent as each finishes (in completion order), `on_round(i, rounds
    done)` after each of its rounds."""
    ctx = worker_context()
    tasks, results = ctx.Queue(), ctx.Queue()
    for index in pending:
        tasks.put(index)
    for _ in range(workers):
        tasks.put(None)
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(spec, list(cells), tasks, results, dict(os.environ), os.getcwd()),
            daemon=True,
        )
        for _ in range(workers)
    ]
    remaining = set(pending)
    try:
        for proc in procs:
            proc.start()
        while remaining:
            try:
                kind, index, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"a worker process died (exit code {dead[0].exitcode}); "
                        "rerun with --resume to finish the job"
                    ) from None
                if all(p.exitcode == 0 for p in procs) and results.empty():
                    raise RuntimeError(
                        "the workers ended with runs left; rerun with --resume"
                    ) from None
                continue
            if kind == "log":
                log(payload)
            elif kind == "round":
                if on_round is not None:
                    on_round(index, payload)
            elif kind == "row":
                remaining.discard(index)
                on_row(index, payload)
            elif kind == "killed":
                raise KeyboardInterrupt
            else:
                raise payload
    except BaseException:
        _stop(procs)
        raise
    for proc in procs:
        proc.join()


def _stop(procs: Sequence[Any], grace: float = 60.0) -> None:
    """SIGTERM every live worker (each marks its run KILLED) and wait for them; SIGKILL after
    `grace` seconds."""
    for proc in procs:
        if proc.pid is not None and proc.is_alive():
            os.kill(proc.pid, signal.SIGTERM)
    for proc in procs:
        if proc.pid is None:  # never started
            continue
        proc.join(timeout=grace)
        if proc.is_alive():
            proc.kill()
            proc.join()
