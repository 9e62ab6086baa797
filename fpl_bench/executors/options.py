"""The flags that choose where runs execute, declared once for `run` and `tune`.

    @executor_options
    def command(*, ..., cluster: ExecutorChoice) -> None:
        if cluster.name != "local": ...

`--executor local` (the default) is the command as it always ran; `ray` and `slurm` hand each
run to a cluster (fpl_bench/executors/dispatch.py). `--tracking-uri` points every run, wherever
it runs, at one MLflow tracking server.
"""

from __future__ import annotations

import functools
import inspect
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from fpl_bench.errors import UsageError
from fpl_bench.executors.config import ClusterConfig, load_cluster_config

EXECUTORS: tuple[str, ...] = ("local", "ray", "slurm")


@dataclass(frozen=True)
class ExecutorChoice:
    """Where a command's runs execute: the executor's name, its settings and the tracking URI
    (None: `MLFLOW_TRACKING_URI`, else SQLite in the output folder)."""

    name: str
    config: ClusterConfig
    tracking_uri: str | None = None

    @property
    def distributed(self) -> bool:
        return self.name != "local"

    def export_tracking_uri(self) -> None:
        """Make `--tracking-uri` this process's tracking store (fpl_bench/tracking.py reads
        MLFLOW_TRACKING_URI), so local runs log there too."""
        if self.tracking_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri


def _option(help_text: str, *decls: str) -> Any:
    return typer.Option(*decls, help=help_text)


# name -> (annotation, default); the order is the order in --help
OPTIONS: dict[str, tuple[Any, Any]] = {
    "executor": (
        Annotated[
            str,
            _option(
                "Where runs execute: local (this machine, as always), ray (one Ray task per run) "
                "or slurm (Slurm jobs through submitit); see docs/cluster.md."
            ),
        ],
        "local",
    ),
    "tracking_uri": (
        Annotated[
            str | None,
            _option(
                "MLflow tracking store every run logs to, e.g. http://host:5000 (default: "
                "$MLFLOW_TRACKING_URI, else OUT/mlflow.db)."
            ),
        ],
        None,
    ),
    "address": (
        Annotated[
            str | None,
            _option("ray: the cluster's address (auto, HOST:PORT); default: a local Ray."),
        ],
        None,
    ),
    "cluster_config": (
        Annotated[
            Path | None,
            _option(
                "TOML file of ray and slurm settings, docs/cluster.md (default "
                "$FPL_BENCH_CLUSTER, else ./fpl-cluster.toml if present)."
            ),
        ],
        None,
    ),
    "slurm_partition": (Annotated[str | None, _option("slurm: partition.")], None),
    "time_min": (Annotated[int | None, _option("slurm: time limit per job, minutes.")], None),
    "gpus": (
        Annotated[
            int | None, _option("slurm: GPUs per job; ray: GPUs per run (default: by --device).")
        ],
        None,
    ),
    "array_parallelism": (
        Annotated[int | None, _option("slurm: array tasks running at once.")],
        None,
    ),
}


def executor_choice(
    *,
    executor: str = "local",
    tracking_uri: str | None = None,
    address: str | None = None,
    cluster_config: Path | None = None,
    slurm_partition: str | None = None,
    time_min: int | None = None,
    gpus: int | None = None,
    array_parallelism: int | None = None,
) -> ExecutorChoice:
    """The flags as an `ExecutorChoice`; cluster flags with `--executor local` are refused."""
    name = executor.strip().lower()
    if name not in EXECUTORS:
        raise UsageError(f"--executor {executor}: unknown; use one of {', '.join(EXECUTORS)}")
    if tracking_uri is not None and not tracking_uri.strip():
        raise UsageError("--tracking-uri is empty; give e.g. http://host:5000")
    ray = {"address": address, "num_gpus": gpus}
    slurm = {
        "partition": slurm_partition,
        "time_min": time_min,
        "gpus_per_node": gpus,
        "array_parallelism": array_parallelism,
    }
    given = {
        "--address": address,
        "--cluster-config": cluster_config,
        "--slurm-partition": slurm_partition,
        "--time-min": time_min,
        "--gpus": gpus,
        "--array-parallelism": array_parallelism,
    }
    if name == "local":
        used = [flag for flag, value in given.items() if value is not None]
        if used:
            raise UsageError(f"{used[0]} applies to --executor ray or slurm; add one of them")
        return ExecutorChoice(name, ClusterConfig(), tracking_uri)
    foreign = ("--slurm-partition", "--time-min", "--array-parallelism")
    for flag in foreign if name == "ray" else ("--address",):
        if given[flag] is not None:
            raise UsageError(f"{flag} does not apply to --executor {name}")
    config = load_cluster_config(
        cluster_config,
        ray=ray if name == "ray" else None,
        slurm=slurm if name == "slurm" else None,
    )
    if name == "ray" and config.ray.address is not None:
        from fpl_bench.executors.ray_backend import check_address

        check_address(config.ray.address)  # before any data is read: ray.init would wait
    return ExecutorChoice(name, config, tracking_uri)


def executor_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: the command takes the executor flags (`OPTIONS`) in the place of its
    keyword-only parameter `cluster`, and receives them as one `ExecutorChoice`."""
    hints = typing.get_type_hints(command, include_extras=True)
    kind = inspect.Parameter.KEYWORD_ONLY
    params: list[inspect.Parameter] = []
    for param in inspect.signature(command).parameters.values():
        if param.name == "cluster":
            params += [
                inspect.Parameter(name, kind, annotation=annotation, default=default)
                for name, (annotation, default) in OPTIONS.items()
            ]
        else:
            params.append(param.replace(kind=kind, annotation=hints[param.name]))

    @functools.wraps(command)
    def with_cluster(**kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in OPTIONS}
        return command(**kwargs, cluster=executor_choice(**values))

    with_cluster.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    with_cluster.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    return with_cluster
