"""One run (cell x seed) as a unit of work any machine can take: `CellTask` in, `CellResult`
out, through `run_cell`, the function every executor calls on its worker.

`run_cell`, in order:
1. points MLflow at the job's tracking store (`CellTask.tracking_uri`) and reads the job's
   method card files (a worker gets resolved methods, not a command line);
2. takes the cell's lock, OUT/locks/<cell>.lock (flock, released by the kernel when the
   process dies; the file names its holder, "pid N host H"): two live processes never run one
   cell, so a retry started while the first try still runs waits for it;
3. asks the tracking store for a done run of the cell's key (`records.done_record`): one found
   is returned as it is (`skipped`), never run again;
4. deletes the key's earlier attempts without a result (left RUNNING by a process that died,
   or ended failed or killed; `records.abandoned_runs`), keeping the run a checkpoint
   continues;
5. runs it with `experiment.run_one` and `resume` on: a checkpoint of an earlier try
   (OUT/checkpoints/, on storage every node sees) continues after its last round, in the same
   MLflow run, with the result of an uninterrupted run (`run_one`'s --resume guarantee).
The data a worker prepares for a grid (`prepare.prepare`) is kept for its next cell of the
same grid.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fpl_bench.catalog import MethodChoice
from fpl_bench.errors import UsageError
from fpl_bench.spec import ExperimentSpec

LOCKS_FOLDER = "locks"


@dataclass(frozen=True)
class CellTask:
    """One run: the grid's spec (all its methods, eps and seeds: what `prepare` reads; `out`
    and `cache_dir` absolute, `resume` on) and the cell's method, eps and seed."""

    spec: ExperimentSpec
    method: MethodChoice
    eps: float | None
    seed: int
    tracking_uri: str

    @property
    def key(self) -> dict[str, Any]:
        """The record key (`run_records.run_key`): the cell's identity everywhere."""
        from fpl_bench.run_records import run_key

        return run_key(self.spec, self.method, self.eps, self.seed)

    @property
    def label(self) -> str:
        from fpl_bench.run_records import run_name

        return run_name(self.key)

    @property
    def rounds(self) -> int:
        from fpl_bench.learners import LEARNERS

        return self.spec.rounds if LEARNERS.get(self.method.learner).trains else 0


@dataclass(frozen=True)
class CellResult:
    """What a worker sends back: `outcome` ran (it trained now), skipped (done before,
    `row` read from the tracking store) or failed (`error`: one line, or a traceback)."""

    key: dict[str, Any]
    outcome: str
    row: dict[str, Any] | None = None
    error: str | None = None
    bad_input: bool = False  # the error is a UsageError's line: something the user can fix
    host: str = field(default_factory=socket.gethostname)


def cell_tasks(specs: Sequence[ExperimentSpec], tracking_uri: str) -> list[CellTask]:
    """Every run of `specs`, in the order a local job runs them (seed, eps, method), with the
    specs made portable: absolute paths, resume on, one process per run."""
    tasks = []
    for spec in specs:
        update: dict[str, Any] = {
            "out": Path(spec.out).resolve(),
            "cache_dir": Path(spec.cache_dir).expanduser().resolve(),
            "resume": True,
            "workers": 1,
        }
        if spec.data_root is not None:
            update["data_root"] = Path(spec.data_root).expanduser().resolve()
        portable = spec.model_copy(update=update)
        tasks += [
            CellTask(portable, choice, eps, seed, tracking_uri)
            for seed in spec.seeds
            for eps in spec.eps
            for choice in spec.methods
        ]
    return tasks


def lock_path(out: Path, key: dict[str, Any]) -> Path:
    """OUT/locks/<hash of the key>.lock: one lock per cell."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return Path(out) / LOCKS_FOLDER / f"{digest[:16]}.lock"


@contextmanager
def cell_lock(out: Path, key: dict[str, Any], log: Callable[[str], None]) -> Iterator[None]:
    """Hold the cell's lock (flock on OUT/locks/<cell>.lock) while the block runs, waiting
    for a live holder; the file names this holder: 'pid N host H'."""
    path = lock_path(out, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            handle.seek(0)
            log(f"waiting for {handle.read().strip() or 'another process'}, which runs this cell")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} host {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()


def checkpoint_run_id(path: Path) -> str | None:
    """The MLflow run a checkpoint continues (None: no readable checkpoint)."""
    if not path.is_file():
        return None
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True).get("mlflow_run_id")
    except Exception:  # a damaged checkpoint: run_one refuses it with its own message
        return None


_PREPARED: dict[str, Any] = {}  # the last grid this process prepared, by its spec's JSON


def _prepared(spec: ExperimentSpec, log: Callable[[str], None]) -> Any:
    from fpl_bench.prepare import prepare

    key = spec.model_dump_json()
    if key not in _PREPARED:
        _PREPARED.clear()
        _PREPARED[key] = prepare(spec, log)
    return _PREPARED[key]


def _print(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_cell(task: CellTask, log: Callable[[str], None] = _print) -> CellResult:
    """Run one cell on this machine, or return its done record (module docstring). Bad input
    and errors come back as a failed result; an interruption (KeyboardInterrupt, SystemExit:
    a signal, a requeue) propagates, leaving the last round's checkpoint."""
    from fpl_bench.catalog import remember_cards
    from fpl_bench.process import configure_process

    configure_process()  # a worker's own settings, before it first imports torch
    os.environ["MLFLOW_TRACKING_URI"] = task.tracking_uri
    remember_cards(task.spec.methods)
    key = task.key
    try:
        return _run_locked(task, key, log)
    except UsageError as err:
        return CellResult(key, "failed", error=str(err), bad_input=True)
    except Exception as err:
        return CellResult(key, "failed", error="".join(traceback.format_exception(err)).rstrip())


def _run_locked(task: CellTask, key: dict[str, Any], raw: Callable[[str], None]) -> CellResult:
    from fpl_bench.executors.records import abandoned_runs, done_record
    from fpl_bench.experiment import run_one
    from fpl_bench.prepare import federation
    from fpl_bench.run_records import checkpoint_path, save_configs, save_partition
    from fpl_bench.tracking import Tracker

    spec, out = task.spec, Path(task.spec.out)

    def log(text: str) -> None:
        raw(f"{task.label}: {text}")

    tracker = Tracker(out)
    with cell_lock(out, key, log):
        done = done_record(tracker, key)
        if done is not None:
            log(f"done before (MLflow run {done['mlflow_run_id']}); skipped")
            return CellResult(key, "skipped", row=done)
        keep = checkpoint_run_id(checkpoint_path(out, key))
        for run_id in abandoned_runs(tracker, key, keep):
            log(f"deleting MLflow run {run_id}, an earlier attempt without a result")
            tracker.client.delete_run(run_id)
        prep = _prepared(spec, lambda text: None)
        fed = federation(prep, task.seed)
        save_configs(spec, out)
        save_partition(fed, out, spec.dataset, task.seed)
        row = run_one(prep, fed, task.method, task.eps, task.seed, tracker, raw)
    return CellResult(key, "ran", row=row)
