"""MLflow tracking: one run per (method, dataset, eps, seed).

Each run holds the full resolved configuration as params, the metrics of every evaluation round
(step = round), the final metrics (mean over the last k evaluations), and the client partition
as an artifact. The tracking URI is `MLFLOW_TRACKING_URI` when set, else a SQLite file in the
output folder (MLflow refuses the plain file store since 3.13).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

EXPERIMENT = "fpl-bench"


def tracking_uri(out_dir: Path) -> str:
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"
    )


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` URI (absolute), None for any other store.

    >>> str(sqlite_file("sqlite:////tmp/runs/mlflow.db"))
    '/tmp/runs/mlflow.db'
    >>> sqlite_file("http://localhost:5000") is None
    True
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    return Path(uri[len(prefix) :]).expanduser().resolve()


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and not math.isnan(float(v))}


class Tracker:
    """Thin wrapper over the MLflow client API (no global active-run state)."""

    def __init__(self, out_dir: Path, experiment: str = EXPERIMENT) -> None:
        from mlflow.tracking import MlflowClient

        # after the import: mlflow sets its own logger levels when it is first imported
        for name in ("mlflow", "alembic", "sqlalchemy"):
            logging.getLogger(name).setLevel(logging.WARNING)

        self.uri = tracking_uri(out_dir)
        self.out_dir = Path(out_dir)
        # A SQLite store keeps the artifacts beside its database, as plain files under
        # <db folder>/mlartifacts/<run id>/artifacts/ (the experiment's artifact location): for
        # the default OUT/mlflow.db that is OUT/mlartifacts, and a run tag names the folder
        # relative to OUT, so a moved or copied folder can still be read. A tracking server
        # keeps them in its own artifact store.
        database = sqlite_file(self.uri)
        self.local = database is not None
        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(experiment)
        if found:
            self.experiment_id = found.experiment_id
        else:
            location = None if database is None else (database.parent / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=location
            )

    def start(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=name, tags=dict(tags))
        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(run.info.run_id, params=items[i : i + 100])
        return run.info.run_id

    def reopen(self, run_id: str) -> bool:
        """Mark an interrupted run RUNNING again to continue it; False when it is gone."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.update_run(run_id, status="RUNNING")
        except MlflowException:
            return False
        return True

    def log_round(self, run_id: str, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [
            Metric(f"round/{k}", v, now, step) for k, v in _finite(metrics).items() if k != "round"
        ]
        if values:
            self.client.log_batch(run_id, metrics=values)

    def finish(
        self,
        run_id: str,
        metrics: Mapping[str, float],
        artifacts: Mapping[str, Any],
        status: str = "FINISHED",
        tags: Mapping[str, str] | None = None,
        quiet: bool = False,
    ) -> None:
        """Final metrics, artifacts and tags, then the run's terminal status. `quiet`: on the
        way out of a failure, a tracking error must not hide the original one."""
        if quiet:
            with contextlib.suppress(Exception):
                self.finish(run_id, metrics, artifacts, status=status, tags=tags)
            return
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        values = [Metric(k, v, now, 0) for k, v in _finite(metrics).items()]
        if tags:
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        if values:
            self.client.log_batch(run_id, metrics=values)
        if artifacts:
            self.log_artifacts(run_id, artifacts)
        self.client.set_terminated(run_id, status=status)

    def log_artifacts(self, run_id: str, artifacts: Mapping[str, Any]) -> None:
        """Each artifact (a file to copy, or an object written as JSON) into the run's artifact
        folder, where the MLflow UI shows it. With tracking in the output folder that folder is
        OUT/mlartifacts/<run id>/artifacts, named relative to OUT by the run's tag
        `fpl_bench.artifacts`."""
        import shutil
        from urllib.parse import unquote, urlparse

        with tempfile.TemporaryDirectory() as tmp:
            for name, obj in artifacts.items():
                path = Path(tmp) / name
                if isinstance(obj, Path):
                    shutil.copyfile(obj, path)
                else:
                    path.write_text(json.dumps(obj))
            self.client.log_artifacts(run_id, tmp)
        if self.local:
            uri = self.client.get_run(run_id).info.artifact_uri
            folder = Path(unquote(urlparse(uri).path))
            with contextlib.suppress(ValueError):  # an experiment made elsewhere: no tag
                relative = folder.relative_to(self.out_dir.resolve())
                self.client.set_tag(run_id, "fpl_bench.artifacts", str(relative))
