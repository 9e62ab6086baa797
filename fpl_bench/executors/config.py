"""Cluster settings: what a run asks of Ray or Slurm, validated once at the boundary.

Defaults live here and nowhere else; a TOML file (`--cluster-config PATH`, else
`$FPL_BENCH_CLUSTER`, else `./fpl-cluster.toml` when it exists) overrides them, and flags
override the file. docs/cluster.md lists every key:

    [ray]
    address = "auto"          # or "HOST:6379", "ray://HOST:10001"; unset: a local Ray instance
    num_cpus = 1              # CPUs per run
    max_retries = 3           # retries of a run whose worker process or node died

    [slurm]
    partition = "gpu"
    time_min = 240            # wall-time limit of one job, minutes
    gpus_per_node = 1         # unset: 1 for --device cuda/auto, 0 for --device cpu
    array_parallelism = 64    # array tasks running at once
    setup = ["module load cuda", "source ~/fpl/.venv/bin/activate"]

>>> ClusterConfig().slurm.time_min
240
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fpl_bench.errors import UsageError

CONFIG_ENV = "FPL_BENCH_CLUSTER"
DEFAULT_CONFIG_FILE = "fpl-cluster.toml"


class RayConfig(BaseModel):
    """How runs become Ray tasks."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    address: str | None = None  # None: start a local Ray instance in this process
    num_cpus: float = Field(1.0, gt=0)  # CPUs a run asks for
    num_gpus: float | None = Field(None, ge=0)  # None: 1 when the run's device is cuda, else 0
    max_retries: int = Field(3, ge=0)  # retries after a worker process or node died
    local_cpus: int | None = Field(None, gt=0)  # CPUs of a local instance (None: all)


class SlurmConfig(BaseModel):
    """How runs become Slurm jobs (through submitit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    partition: str | None = None  # None: the cluster's default partition
    time_min: int = Field(240, gt=0)  # wall-time limit of one job
    gpus_per_node: int | None = Field(None, ge=0)  # None: 1 for a cuda/auto device, else 0
    cpus_per_task: int = Field(2, gt=0)
    mem_gb: float | None = Field(None, gt=0)
    array_parallelism: int = Field(64, gt=0)  # array tasks running at once
    runs_per_job: int = Field(1, gt=0)  # runs one job takes, one after the other
    signal_delay_s: int = Field(120, ge=0)  # USR2 this long before the time limit
    max_requeues: int = Field(3, ge=0)  # time-outs and pre-emptions a job survives
    setup: list[str] = Field(default_factory=list)  # shell lines run before each job
    backend: Literal["slurm", "local"] = "slurm"  # local: submitit's LocalExecutor, no Slurm
    folder: str = "slurm"  # submitit's job files, under --out


class ClusterConfig(BaseModel):
    """The `[ray]` and `[slurm]` tables of a cluster config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ray: RayConfig = Field(default_factory=RayConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)


def config_file(path: Path | None) -> Path | None:
    """The cluster config file to read: `path`, else $FPL_BENCH_CLUSTER, else
    ./fpl-cluster.toml when it exists, else None (the defaults above)."""
    if path is not None:
        if not Path(path).is_file():
            raise UsageError(f"--cluster-config {path}: no such file; see docs/cluster.md")
        return Path(path)
    if os.environ.get(CONFIG_ENV):
        env = Path(os.environ[CONFIG_ENV])
        if not env.is_file():
            raise UsageError(f"${CONFIG_ENV}={env}: no such file; unset it or fix the path")
        return env
    local = Path(DEFAULT_CONFIG_FILE)
    return local if local.is_file() else None


def load_cluster_config(
    path: Path | None = None, *, ray: dict | None = None, slurm: dict | None = None
) -> ClusterConfig:
    """The cluster settings: defaults, then the file (`config_file`), then `ray`/`slurm`
    values from flags (None values are not given). A bad key or value is one UsageError."""
    source = config_file(path)
    where = str(source) if source else "cluster settings"
    data: dict = {}
    if source is not None:
        try:
            data = tomllib.loads(source.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise UsageError(f"bad cluster config {source}: {' '.join(str(err).split())}") from None
    for table, given in (("ray", ray), ("slurm", slurm)):
        values = {k: v for k, v in (given or {}).items() if v is not None}
        if values:
            data[table] = {**data.get(table, {}), **values}
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise UsageError(
            f"bad {where}: {key}: {first['msg']}; see docs/cluster.md for the keys"
        ) from None
