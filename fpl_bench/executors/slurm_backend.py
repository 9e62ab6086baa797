"""`--executor slurm`: runs as Slurm jobs through submitit, one job array per submission.

Each array task (`CellJob`) takes `SlurmConfig.runs_per_job` runs and runs them one after
the other with `cells.run_cell`. Pre-emption and time-outs: Slurm signals the job
(`--signal=USR2@signal_delay_s`; SIGTERM or SIGUSR1 where a site's pre-emption sends those);
submitit's handler then calls `CellJob.checkpoint`, which resubmits the same runs, and requeues
the job. Nothing else needs saving: each run keeps a checkpoint after every round in OUT (on
storage every node sees), so the requeued job resumes each run after its last round and skips
the runs the tracking store has as done. `backend = "local"` uses submitit's LocalExecutor:
the same path, jobs as processes on this machine (how CI tests it, docs/cluster.md).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fpl_bench.errors import UsageError
from fpl_bench.executors.cells import CellResult, CellTask, run_cell
from fpl_bench.executors.config import SlurmConfig

try:
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # no [slurm] extra: `SlurmExecutor` says what to install when it is used
    _Checkpointable = object  # type: ignore[assignment,misc]

# Signals that mean "checkpoint and requeue" besides submitit's own (USR2).
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def job_gpus(device: str, config_gpus: int | None) -> int:
    """GPUs per job: the config's number, else 1 for a cuda or auto device, else 0.

    >>> job_gpus("cpu", None), job_gpus("auto", None), job_gpus("cpu", 2)
    (0, 1, 2)
    """
    if config_gpus is not None:
        return config_gpus
    return 0 if device == "cpu" else 1


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise UsageError(
            "--executor slurm needs submitit: pip install 'fpl-bench[slurm]' (or pip install "
            "submitit)"
        ) from None
    return submitit


def _route_preemption_signals() -> None:
    """Inside a submitit job: SIGTERM and SIGUSR1 checkpoint and requeue as submitit's own
    signal does (its handler, registered before the job's function runs)."""
    from submitit import JobEnvironment

    handler = signal.getsignal(JobEnvironment._usr_sig())
    if callable(handler):
        for signum in PREEMPTION_SIGNALS:
            signal.signal(signum, handler)


class CellJob(_Checkpointable):
    """One array task: its runs, one after the other. Requeued as it is (submitit's
    `Checkpointable.checkpoint`): the runs' own checkpoints hold their state."""

    def __call__(self, tasks: Sequence[CellTask]) -> list[CellResult]:
        _route_preemption_signals()
        return [run_cell(task) for task in tasks]


class CheckpointableCall(_Checkpointable):
    """A job calling `fn(*chunk)` (a chunk: the call's arguments), requeued as it is on
    pre-emption; `fn` keeps its own state (a tuning worker: the study's storage)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, call: Sequence[Any]) -> Any:
        _route_preemption_signals()
        return self.fn(*call)


class SlurmExecutor:
    """Submits runs as one job array and waits for every array task's results."""

    POLL_S = 1.0

    def __init__(self, config: SlurmConfig, out: Path) -> None:
        self.config = config
        self.folder = Path(out).resolve() / config.folder

    def executor(self, device: str) -> Any:
        """The submitit executor with this config's parameters."""
        submitit = _submitit()
        cfg = self.config
        cluster = "local" if cfg.backend == "local" else "slurm"
        try:
            executor = submitit.AutoExecutor(
                folder=self.folder / "%j", cluster=cluster, slurm_max_num_timeout=cfg.max_requeues
            )
        except RuntimeError as err:  # no srun/sbatch on this machine
            raise UsageError(
                f"--executor slurm: {err} Submit from the cluster's login node, or set "
                'backend = "local" in [slurm] of --cluster-config to run the jobs here'
            ) from None
        params: dict[str, Any] = {
            "name": "fpl-bench",
            "timeout_min": cfg.time_min,
            "gpus_per_node": job_gpus(device, cfg.gpus_per_node),
            "cpus_per_task": cfg.cpus_per_task,
            "tasks_per_node": 1,
            "slurm_array_parallelism": cfg.array_parallelism,
            "slurm_signal_delay_s": cfg.signal_delay_s,
        }
        if cfg.partition is not None:
            params["slurm_partition"] = cfg.partition
        if cfg.mem_gb is not None:
            params["mem_gb"] = cfg.mem_gb
        if cfg.setup:
            params["slurm_setup"] = list(cfg.setup)
        if cluster == "local":
            params["gpus_per_node"] = 0  # the local executor would pin devices by index
        executor.update_parameters(**params)
        return executor

    def map(
        self,
        job_fn: Any,
        chunks: Sequence[Any],
        *,
        device: str,
        on_done: Callable[[int, Any, str | None], None],
        log: Callable[[str], None],
        what: str = "runs",
    ) -> None:
        """Submit `job_fn(chunk)` for each chunk as one job array; `on_done(index, value,
        None)` or `on_done(index, None, error line)` as each job ends."""
        if not chunks:
            return
        executor = self.executor(device)
        try:
            jobs = executor.map_array(job_fn, list(chunks))
        except Exception as err:  # sbatch missing or refusing: what the user can fix
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UsageError(f"--executor slurm: submitting failed ({first})") from None
        log(f"{what} submitted as {len(jobs)} Slurm jobs (job files in {self.folder})")
        waiting = dict(zip(jobs, range(len(jobs)), strict=True))
        try:
            while waiting:
                for job in [j for j in waiting if j.done()]:
                    index = waiting.pop(job)
                    try:
                        value, error = job.result(), None
                    except Exception as err:  # the job failed or was cancelled
                        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                        value, error = None, f"job {job.job_id}: {first}"
                    on_done(index, value, error)
                if waiting:
                    time.sleep(self.POLL_S)
        except BaseException:
            for job in waiting:
                job.cancel(check=False)
            raise

    def run(
        self,
        tasks: Sequence[CellTask],
        on_result: Callable[[CellTask, CellResult], None],
        log: Callable[[str], None],
    ) -> None:
        """`SlurmConfig.runs_per_job` cells per array task (`CellJob`)."""
        size = self.config.runs_per_job
        chunks = [list(tasks[i : i + size]) for i in range(0, len(tasks), size)]

        def on_done(index: int, results: Any, error: str | None) -> None:
            for k, task in enumerate(chunks[index]):
                failed = CellResult(task.key, "failed", error=error)
                on_result(task, failed if error is not None else results[k])

        self.map(
            CellJob(),
            chunks,
            device=tasks[0].spec.device if tasks else "auto",
            on_done=on_done,
            log=log,
            what=f"{len(tasks)} runs",
        )
