"""One invocation of `fpl-bench run` as a job inside its output folder.

Before any data is loaded the job checks what it will write to (the output and cache folders,
the tracking store) and fails fast with one line when something is unusable; then it takes the
folder's lock (two jobs writing one `--out` would interleave results.csv and MLflow runs) and
writes its own record `OUT/jobs/<job id>.json` (command line, start, end, status), so a folder
that holds several jobs stays readable. Times are ISO 8601 with the UTC offset; a job that
stops on an error records the error's line as its `reason`, and a job refused before any of its
runs finished (bad input found while preparing: a `UsageError`) leaves no record at all, as
input refused before the job started leaves none: the error line on stderr says why.
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
from datetime import datetime
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
                f"MLFLOW_TRACKING_URI={uri} (--tracking-uri or the environment): cannot reach "
                f"{host}:{port} ({err}); start the server, or drop --tracking-uri and unset "
                "MLFLOW_TRACKING_URI to track in the output folder"
            ) from None
        return
    if scheme == "sqlite":
        db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
        if db is None or not str(db):
            raise UsageError(f"MLFLOW_TRACKING_URI={uri!r}: use sqlite:////absolute/path.db")
        check_writable_folder(db.parent, "the tracking database's folder")
        _check_sqlite_file(db, uri)
        return
    if scheme in ("postgresql", "mysql", "mssql", "databricks"):
        return  # MLflow reports these itself, fast
    raise UsageError(
        f"MLFLOW_TRACKING_URI={uri!r}: unsupported scheme {parsed.scheme or '(none)'!r}; use "
        "http(s)://host:port, sqlite:////path/mlflow.db or postgresql://..., or unset it"
    )


def sqlite_problem(db: Path) -> str | None:
    """Why an existing `db` cannot be an SQLite database ("is not an SQLite database", "cannot
    be read (...)"), or None: a missing or empty file is a new database, and a file that starts
    with SQLite's 16-byte header is one."""
    if not db.exists():
        return None
    if db.is_dir():
        return "is a folder, not an SQLite database"
    try:
        with open(db, "rb") as f:
            header = f.read(16)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    return None if header in (b"", b"SQLite format 3\0") else "is not an SQLite database"


def _check_sqlite_file(db: Path, uri: str) -> None:
    """Refuse an existing `db` that is not an SQLite database (a folder, a text file): MLflow
    would fail on it with a long traceback."""
    problem = sqlite_problem(db)
    if problem is None:
        return
    if os.environ.get("MLFLOW_TRACKING_URI") == uri:
        raise UsageError(
            f"MLFLOW_TRACKING_URI={uri}: {db} {problem}; point the variable at an SQLite file "
            "or a new path, or unset it to track in the output folder"
        )
    raise UsageError(f"tracking database {db} {problem}; move it away or use another --out")


def now_iso() -> str:
    """The local time as ISO 8601 with its UTC offset, to the second: 2026-12-06T14:03:12+01:00."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def error_line(err: BaseException) -> str:
    """An error as one line: a UsageError's message as printed; otherwise 'Type: first line'."""
    lines = str(err).strip().splitlines()
    text = " ".join(lines[0].split()) if lines else ""
    if isinstance(err, UsageError):
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@dataclass
class JobRecord:
    job_id: str
    command: list[str]
    pid: int
    started: str  # ISO 8601 (`now_iso`)
    ended: str | None = None
    status: str = "running"  # running | finished | failed | interrupted
    reason: str | None = None  # why a failed job stopped: the error's line
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
            started=now_iso(),
        )
        self.path = out / "jobs" / f"{self.record.job_id}.json"
        self.save()

    def save(self) -> None:
        blob = json.dumps(asdict(self.record), indent=1)
        write_atomic(self.path, lambda tmp: Path(tmp).write_text(blob))

    def add_run(self, run_id: str) -> None:
        self.record.runs.append(run_id)
        self.save()

    def end(self, status: str, *, reason: str | None = None) -> None:
        self.record.status, self.record.ended, self.record.reason = status, now_iso(), reason
        self.save()

    def fail(self, err: BaseException) -> None:
        """Record why the job stopped on `err`. Input refused before any run finished (a
        UsageError: the job did not really start) removes the record instead; anything else
        ends it as failed, with the error's line as its reason."""
        if isinstance(err, UsageError) and not self.record.runs:
            self.path.unlink(missing_ok=True)
            return
        self.end("failed", reason=error_line(err))
