"""`--executor ray`: each run a Ray task (`cells.run_cell`) asking for the resources its
device needs, on the cluster at `--address` or on a Ray instance started in this process.

A task whose worker process or node dies is retried by Ray (`RayConfig.max_retries`); the
retry resumes from the run's last checkpoint on the shared output folder (`cells.run_cell`).
An error inside a run is not retried: it comes back as a failed result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from fpl_bench.errors import UsageError
from fpl_bench.executors.cells import CellResult, CellTask, run_cell
from fpl_bench.executors.config import RayConfig


def task_gpus(device: str, config_gpus: float | None, cluster_has_gpus: bool) -> float:
    """GPUs a run asks for: the config's number, else 1 for --device cuda (and for auto on a
    cluster with GPUs; Ray hides every GPU from a task that asks for none), else 0.

    >>> task_gpus("auto", None, cluster_has_gpus=False), task_gpus("cuda", None, False)
    (0.0, 1.0)
    """
    if config_gpus is not None:
        return float(config_gpus)
    if device.startswith("cuda") or (device == "auto" and cluster_has_gpus):
        return 1.0
    return 0.0


def check_address(address: str, *, timeout: float = 3.0) -> None:
    """Refuse, fast, a HOST:PORT (or ray://HOST:PORT) no Ray head answers on: `ray.init`
    would wait minutes for it. 'auto' (the cluster this node belongs to) is left to Ray."""
    import socket

    text = address.removeprefix("ray://")
    if text in ("auto", "local"):
        return
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--address {address}: expected HOST:PORT (e.g. head-node:6379) or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise UsageError(
            f"--address {address}: no Ray head answers there ({err.strerror or err}); start one "
            "with `ray start --head --port PORT`, or leave --address out for a local Ray"
        ) from None


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError(
            "--executor ray needs Ray: pip install 'fpl-bench[ray]' (or pip install 'ray[default]')"
        ) from None
    return ray


class RayExecutor:
    """Runs cells as Ray tasks; `run` returns when every one has a result."""

    def __init__(self, config: RayConfig) -> None:
        self.config = config
        self.owned = False  # whether this executor connected (and so disconnects)

    def connect(self) -> Any:
        ray = _ray()
        if ray.is_initialized():  # the caller's own connection
            return ray
        kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
        if self.config.address is None:
            kwargs.update(num_cpus=self.config.local_cpus, include_dashboard=False)
        else:
            check_address(self.config.address)
            kwargs["address"] = self.config.address
        try:
            ray.init(**kwargs)
        except ConnectionError as err:
            raise UsageError(
                f"--address {self.config.address}: cannot reach a Ray cluster ({err}); start one "
                "with `ray start --head` or leave --address out for a local one"
            ) from None
        self.owned = True
        return ray

    def map(
        self,
        fn: Callable[..., Any],
        calls: Sequence[tuple[Any, ...]],
        *,
        device: str,
        names: Sequence[str],
        on_done: Callable[[int, Any, str | None], None],
        log: Callable[[str], None],
        what: str = "runs",
    ) -> None:
        """Run `fn(*call)` for each call as a Ray task (retried on worker death), calling
        `on_done(index, value, None)` or `on_done(index, None, error line)` as each ends."""
        if not calls:
            return
        ray = self.connect()
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        remote = ray.remote(fn)
        options = {
            "num_cpus": self.config.num_cpus,
            "num_gpus": task_gpus(device, self.config.num_gpus, gpus),
            "max_retries": self.config.max_retries,
            "retry_exceptions": False,
        }
        pending = {
            remote.options(**options, name=name).remote(*call): index
            for index, (call, name) in enumerate(zip(calls, names, strict=True))
        }
        log(f"{len(calls)} {what} submitted to Ray ({ray.get_runtime_context().gcs_address})")
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                index = pending.pop(ready[0])
                try:
                    value, error = ray.get(ready[0]), None
                except ray.exceptions.RayError as err:
                    first = (str(err).strip().splitlines() or [""])[0]
                    value, error = None, f"{type(err).__name__}: {first}"
                on_done(index, value, error)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            if self.owned:
                ray.shutdown()
                self.owned = False

    def run(
        self,
        tasks: Sequence[CellTask],
        on_result: Callable[[CellTask, CellResult], None],
        log: Callable[[str], None],
    ) -> None:
        """Each cell a task running `cells.run_cell`."""

        def on_done(index: int, value: Any, error: str | None) -> None:
            task = tasks[index]
            on_result(task, value if error is None else CellResult(task.key, "failed", error=error))

        self.map(
            run_cell,
            [(task,) for task in tasks],
            device=tasks[0].spec.device if tasks else "auto",
            names=[task.label for task in tasks],
            on_done=on_done,
            log=log,
        )
