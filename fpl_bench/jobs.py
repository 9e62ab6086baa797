"""One invocation of `fpl-bench run` as a job inside its output folder.

Before any data is loaded the job checks what it will write to (the output and cache folders,
the tracking store) and fails fast with one line when something is unusable; then it takes the
folder's lock (two jobs writing one `--out` would interleave results.csv and MLflow runs) and
writes its own record `OUT/jobs/<job id>.json` (command line, start, end, status), so a folder
that holds several jobs stays readable.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from fpl_bench.errors import UsageError
from fpl_bench.io import write_atomic


def check_writable_folder(path: Path, what: str) -> None:
    """Create `path` if needed and prove it can hold a file; UsageError otherwise."""
    if str(path).strip() == "":
        raise UsageError(f"{what} is empty; give a folder, e.g. runs/default")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file, not a folder; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".fpl-bench-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or str(err)
        raise UsageError(f"{what} {path} is not writable ({reason}); give another folder") from None


def check_tracking_uri(uri: str, *, timeout: float = 3.0) -> None:
    """Refuse, fast, a tracking URI MLflow could not use (instead of minutes of retries)."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if scheme in ("http", "https"):
        host = parsed.hostname
        port = parsed.port or (443 if scheme == "https" else 80)
        if not host:
            raise UsageError(f"MLFLOW_TRACKING_URI={uri!r} names no host; e.g. http://host:5000")
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as err:
            raise UsageError(
                f"MLFLOW_TRACKING_URI={uri}: cannot reach {host}:{port} ({err}); start the "
                "server or unset MLFLOW_TRACKING_URI to track in the output folder"
            ) from None
        return
    if scheme == "sqlite":
        db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
        if db is None or not str(db):
            raise UsageError(f"MLFLOW_TRACKING_URI={uri!r}: use sqlite:////absolute/path.db")
        check_writable_folder(db.parent, "the tracking database's folder")
        return
    if scheme in ("postgresql", "mysql", "mssql", "databricks"):
        return  # MLflow reports these itself, fast
    raise UsageError(
        f"MLFLOW_TRACKING_URI={uri!r}: unsupported scheme {parsed.scheme or '(none)'!r}; use "
        "http(s)://host:port, sqlite:////path/mlflow.db or postgresql://..., or unset it"
    )


@dataclass
class JobRecord:
    job_id: str
    command: list[str]
    pid: int
    started: float
    ended: float | None = None
    status: str = "running"  # running | finished | failed | interrupted
    runs: list[str] = field(default_factory=list)  # the MLflow run ids this job wrote


@contextmanager
def output_lock(out: Path) -> Any:
    """Hold OUT/.lock (flock) for the job; a second job on the same folder is refused."""
    path = out / ".lock"
    handle: IO[str] = open(path, "a+")  # noqa: SIM115 - held for the with-block
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise UsageError(
                    f"another fpl-bench job ({holder}) is writing to {out}; wait for it or "
                    "use another --out"
                ) from None
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        handle.close()


class Job:
    """The record of one invocation in OUT/jobs/, rewritten atomically as it changes."""

    def __init__(self, out: Path, argv: list[str] | None = None) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.record = JobRecord(
            job_id=f"{stamp}-{uuid.uuid4().hex[:6]}",
            command=list(sys.argv if argv is None else argv),
            pid=os.getpid(),
            started=time.time(),
        )
        self.path = out / "jobs" / f"{self.record.job_id}.json"
        self.save()

    def save(self) -> None:
        blob = json.dumps(asdict(self.record), indent=1)
        write_atomic(self.path, lambda tmp: Path(tmp).write_text(blob))

    def add_run(self, run_id: str) -> None:
        self.record.runs.append(run_id)
        self.save()

    def end(self, status: str) -> None:
        self.record.status, self.record.ended = status, time.time()
        self.save()
