"""Where studies live and the lock their workers share.

`StorageTarget`: `sqlite:///OUT/optuna.db` for one worker, a `JournalFileBackend` file
(`OUT/optuna.journal`) for worker processes on one machine, `postgresql://` for workers on many
machines. RDB storages (SQLite, PostgreSQL) are `heartbeat.HeartbeatStorage`s that record the
heartbeats of running trials; `StudyLock` is a file lock beside a sqlite or journal file, or a
PostgreSQL advisory lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.trial import FrozenTrial

from fpl_bench.errors import UsageError
from fpl_bench.tune.heartbeat import HeartbeatStorage

HEARTBEAT_INTERVAL = 20  # seconds between a running trial's heartbeats
GRACE_FACTOR = 3  # a trial is stale after GRACE_FACTOR missed heartbeats


@dataclass(frozen=True)
class StorageTarget:
    """Where studies live: kind 'sqlite' | 'postgresql' (URLs) | 'journal' (a file path)."""

    kind: Literal["sqlite", "postgresql", "journal"]
    location: str

    @property
    def shown(self) -> str:
        """The location with any password replaced by ***."""
        head, at, tail = self.location.rpartition("@")
        if not at or "://" not in head:
            return self.location
        scheme, _, userinfo = head.partition("://")
        user = userinfo.split(":", 1)[0]
        return f"{scheme}://{user}:***@{tail}" if ":" in userinfo else self.location

    @property
    def rdb_url(self) -> str:
        """The SQLAlchemy URL: PostgreSQL through psycopg2 (SQLAlchemy 2.1's default driver is
        psycopg 3, which is not a dependency)."""
        if self.kind == "postgresql":
            return "postgresql+psycopg2://" + self.location.split("://", 1)[1]
        return self.location

    @property
    def file(self) -> Path | None:
        """The file of a sqlite or journal storage (None for a server)."""
        if self.kind == "journal":
            return Path(self.location)
        if self.kind == "sqlite":
            return Path(self.location.removeprefix("sqlite:///"))
        return None


STORAGE_HELP = (
    "use sqlite:///FILE.db (one worker), FILE.journal (worker processes on one machine) "
    "or postgresql://USER:PASSWORD@HOST:PORT/DB (workers on many machines)"
)


def parse_storage(text: str | None, *, out: Path, workers: int = 1) -> StorageTarget:
    """The `--storage` value (default: OUT/optuna.db, or OUT/optuna.journal for workers > 1)."""
    if text is None:
        out = Path(out).resolve()
        if workers > 1:
            return StorageTarget("journal", str(out / "optuna.journal"))
        return StorageTarget("sqlite", f"sqlite:///{out / 'optuna.db'}")
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("postgresql", "postgres", "postgresql+psycopg2"):
        return StorageTarget("postgresql", "postgresql://" + text.split("://", 1)[1])
    if scheme == "sqlite":
        if workers > 1:
            raise UsageError(
                f"--storage {text}: SQLite is for one worker (--workers {workers}); "
                "use OUT/optuna.journal or postgresql://"
            )
        return StorageTarget("sqlite", text)
    if not scheme and text.endswith(".journal"):
        return StorageTarget("journal", str(Path(text).resolve()))
    shown = StorageTarget("postgresql", text).shown
    raise UsageError(f"--storage {shown}: unknown storage {scheme or text!r}; {STORAGE_HELP}")


def check_storage(target: StorageTarget, *, create: bool = True) -> None:
    """Refuse, fast and in one line, a storage that cannot be used: an unreachable database
    (5 s connect timeout) or a file whose folder does not exist."""
    if target.kind == "postgresql":
        import psycopg2

        try:
            psycopg2.connect(target.location, connect_timeout=5).close()
        except psycopg2.Error as err:
            reason = " ".join(str(err).split()) or type(err).__name__
            raise UsageError(
                f"--storage {target.shown}: cannot connect ({reason}); start the server or fix "
                "the URL (.ci/postgres.sh starts one on this machine)"
            ) from None
        return
    path = target.file
    assert path is not None
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    if not path.parent.is_dir():
        raise UsageError(f"--storage {target.shown}: folder {path.parent} does not exist")


def open_storage(
    target: StorageTarget,
    *,
    heartbeat_interval: int | None = None,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> optuna.storages.BaseStorage:
    """The Optuna storage; RDB storages get a heartbeat when `heartbeat_interval` is given."""
    if target.kind == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(target.location))
    connect = {"timeout": 60} if target.kind == "sqlite" else {"connect_timeout": 10}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return HeartbeatStorage(
            target.rdb_url,
            engine_kwargs={"pool_pre_ping": True, "connect_args": connect},
            heartbeat_interval=heartbeat_interval,
            grace_period=None if heartbeat_interval is None else GRACE_FACTOR * heartbeat_interval,
            heartbeat_stale_trial_callback=on_stale if heartbeat_interval else None,
        )


def lock_path(storage_file: Path) -> str:
    """The file StudyLock flocks beside a sqlite or journal storage file."""
    return f"{storage_file}.fpl-lock"


class StudyLock:
    """A lock every worker of a storage shares: held while a worker counts a study and Optuna
    creates its next trial (and while storage tables, studies and MLflow runs are created).

    A file lock (flock) beside a sqlite or journal file; a PostgreSQL advisory lock on the
    database. Both are released by the system when the holder dies. `release` is idempotent.
    """

    def __init__(self, target: StorageTarget) -> None:
        self.target, self.held = target, False
        self._fd: int | None = None
        self._conn: Any = None
        if target.kind == "postgresql":
            import psycopg2

            self._conn = psycopg2.connect(target.location, connect_timeout=10)
            self._conn.autocommit = True
            with self._conn.cursor() as cur:  # let the server notice a dead holder in ~1 min
                cur.execute("SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10")
            digest = hashlib.sha256(b"fpl-bench tune").digest()
            self._key = int.from_bytes(digest[:8], "big", signed=True)
        else:
            path = target.file
            assert path is not None
            # not PATH.lock: Optuna's journal backend takes that name for its own lock file,
            # waits 30 s while it exists, then deletes it (and with it this flock's file)
            self._fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o644)

    def acquire(self) -> None:
        if self.held:
            return
        if self._conn is not None:
            with self._conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_lock(%s)", (self._key,))
        else:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        if self._conn is not None:
            with self._conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", (self._key,))
        else:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self.held = False

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def close(self) -> None:
        self.release()
        if self._conn is not None:
            self._conn.close()
        if self._fd is not None:
            os.close(self._fd)
