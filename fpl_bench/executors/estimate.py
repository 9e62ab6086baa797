"""What a suite asks of a cluster, for `run --suite NAME --dry-run --executor ray|slurm`:
each pending cell's resource request and an estimate of the GPU-hours (from the dry run's
time estimates: fpl_bench/suite.py `estimate_cell`, `cell_flops`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fpl_bench.executors.options import ExecutorChoice

DONE = ("finished", "diverged")


def run_request(choice: ExecutorChoice, device: str) -> dict[str, Any]:
    """The resources one run asks for. A dry run does not know the cluster: a run on device
    auto is counted with one GPU (what it asks for on a cluster that has GPUs)."""
    if choice.name == "ray":
        from fpl_bench.executors.ray_backend import task_gpus

        ray = choice.config.ray
        return {"cpus": ray.num_cpus, "gpus": task_gpus(device, ray.num_gpus, True)}
    from fpl_bench.executors.slurm_backend import job_gpus

    slurm = choice.config.slurm
    return {
        "cpus": slurm.cpus_per_task,
        "gpus": job_gpus(device, slurm.gpus_per_node),
        "partition": slurm.partition or "(default)",
        "time_min": slurm.time_min,
    }


def gpu_hours(rows: Sequence[Mapping[str, Any]], gpus: float) -> tuple[float, int]:
    """(GPU-hours of the pending rows with a time estimate, how many pending rows have none).

    >>> gpu_hours([{"status": "pending", "estimate_s": 7200.0}], 1.0)
    (2.0, 0)
    """
    todo = [r for r in rows if r["status"] not in DONE]
    known = [float(r["estimate_s"]) for r in todo if r["estimate_s"] is not None]
    return sum(known) * gpus / 3600, len(todo) - len(known)


def format_requests(
    rows: Sequence[Mapping[str, Any]], choice: ExecutorChoice, device: str = "auto"
) -> str:
    """Lines to print after the dry run: the request of each pending cell, the number of
    jobs (Slurm) and the GPU-hours."""
    request = run_request(choice, device)
    todo = [r for r in rows if r["status"] not in DONE]
    shown = ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in request.items()
    )
    lines = [f"cluster requests (--executor {choice.name}, device {device}): each run {shown}"]
    if device == "auto":
        lines.append("  (device auto: a run asks for a GPU where the cluster has one)")
    for row in todo:
        lines.append(
            f"  {row['dataset']}  {row['method']}  eps={row['eps']}  seed={row['seed']}  "
            f"gpus={request['gpus']:g}  cpus={request['cpus']:g}  {row['estimate']}"
        )
    if choice.name == "slurm":
        slurm = choice.config.slurm
        jobs = math.ceil(len(todo) / slurm.runs_per_job)
        lines.append(
            f"slurm: {jobs} array tasks of up to {slurm.runs_per_job} runs, at most "
            f"{slurm.array_parallelism} at once, {slurm.time_min} min each (a run past the "
            "limit is requeued and resumes from its checkpoint)"
        )
    hours, unknown = gpu_hours(rows, float(request["gpus"]))
    what = "GPU-hours" if request["gpus"] else "GPU-hours (the runs ask for no GPU)"
    lines.append(
        f"{what}: {hours:.2f} for {len(todo)} runs to do"
        + (f" (+{unknown} runs of unknown time)" if unknown else "")
    )
    return "\n".join(lines)
