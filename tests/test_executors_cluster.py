"""The cluster executors with real components: a Ray cluster of a head and a worker node
started with `ray start` on this machine, submitit's LocalExecutor (the Slurm path without
Slurm: docs/cluster.md says why CI has no slurmctld), and an MLflow tracking server on
PostgreSQL when FPL_TEST_POSTGRES_URL is set (`.ci/postgres.sh` prints one; else each job's
SQLite store). A 4-cell suite runs on each; one run's process is killed (Ray) or pre-empted
(SIGUSR1 under submitit) mid-run, after its first checkpoint. Every cell must be recorded
exactly once, the interrupted one continuing its own MLflow run, with the numbers of
`--executor local`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pytest

pytestmark = pytest.mark.slow  # clusters, a tracking server and CLI jobs in child processes

POSTGRES_URL = os.environ.get("FPL_TEST_POSTGRES_URL")
SLURM_CONF = os.environ.get("FPL_TEST_SLURM_CONF")  # `.ci/slurm.sh` starts one, prints it
RAY_TOKEN = uuid.uuid4().hex  # the test cluster's auth token: its nodes and its driver share it

# Four private cells of a few rounds on the embedded default: each round takes a few hundred
# milliseconds, long enough to be interrupted between its first checkpoint and its end.
SUITE = """
name = "cluster4"
summary = "four cells for the cluster executor tests"

[run]
rounds = 6
clients = 2
shots = 2
eval_every = 2
last_k = 2
dataset_options = { n_train_per_class = 4, n_test_per_class = 2, n_val_per_class = 2 }

[[grid]]
methods = ["promptfl", "dpfpl"]
datasets = ["synthetic"]
eps = [1]
seeds = [0, 1]
"""
KEY = ["method", "learner", "scheme", "dataset", "protocol", "trust", "eps", "seed"]
KEY += ["config_hash"]
COMPARED = [*KEY, "status", "local_acc", "neighbor_acc", "base_acc", "novel_acc", "hm"]
COMPARED += ["eps_spent", "noise_multiplier", "steps"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    env.update(
        HF_HUB_OFFLINE="1",
        MLFLOW_ENABLE_ASYNC_LOGGING="false",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_DEDUP_LOGS="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=RAY_TOKEN,
        PYTHONUNBUFFERED="1",
    )
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fpl_bench.cli", *args]


class Service:
    """A child process in its own session whose output is read by a thread; stopped with its
    whole process group (it and everything it started, by the group's id)."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                assert self.proc.poll() is None, "".join(self.seen)
                continue
            self.seen.append(line)
            if text in line:
                return
        raise AssertionError(f"no {text!r} within {timeout} s:\n{''.join(self.seen)}")

    def output(self) -> str:
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "".join(self.seen)

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
                if sig == signal.SIGTERM:  # the group's other members may still be going
                    time.sleep(1)
                    continue


@contextlib.contextmanager
def ray_cluster(root: Path):
    """A head node and one worker node, 1 CPU each, on ports of their own; yields the
    address. Torn down (both process groups) on the way out. Ray gives a node 30 s to
    register; on a loaded machine it may miss that, so a node that fails to start is started
    once more on fresh ports."""
    temp = Path(f"/tmp/fr-{uuid.uuid4().hex[:6]}")  # Unix socket paths must stay short
    ray = str(Path(sys.executable).parent / "ray")
    common = ["--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1"]
    common += ["--disable-usage-stats"]
    each = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port")
    each += ("dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")
    base = 20000 + (os.getpid() % 400) * 100  # worker ports: a range per node

    def ports(*names: str) -> list[str]:
        return [arg for name in names for arg in (f"--{name}", str(_free_port()))]

    def head(port: int) -> list[str]:
        cmd = [ray, "start", "--head", "--port", str(port), "--temp-dir", str(temp)]
        cmd += ["--include-dashboard", "false", *common]
        cmd += ports(*each, "ray-client-server-port", "dashboard-port")
        return [*cmd, "--min-worker-port", str(base), "--max-worker-port", str(base + 49)]

    def worker(port: int) -> list[str]:
        cmd = [ray, "start", "--address", f"127.0.0.1:{port}", *common, *ports(*each)]
        return [*cmd, "--min-worker-port", str(base + 50), "--max-worker-port", str(base + 99)]

    services: list[Service] = []

    def start(cmd: list[str], last: bool) -> bool:
        services.append(Service(cmd, root, _env()))
        try:
            services[-1].wait_for("Ray runtime started", 120)
        except AssertionError:
            services.pop().stop()
            if last:
                raise
            return False
        return True

    try:
        port = _free_port()
        if not start(head(port), last=False):
            port = _free_port()
            start(head(port), last=True)
        if not start(worker(port), last=False):
            start(worker(port), last=True)
        yield f"127.0.0.1:{port}"
    finally:
        for service in reversed(services):
            service.stop()
        subprocess.run(["rm", "-rf", str(temp)], check=False)


class TrackingServer:
    """An MLflow server on a fresh schema of the PostgreSQL database, started at once; `uri`
    waits until it answers."""

    def __init__(self, name: str, root: Path) -> None:
        import psycopg2

        self.schema = f"mlflow_{name}_{uuid.uuid4().hex[:8]}"
        with contextlib.closing(psycopg2.connect(POSTGRES_URL)) as conn:
            conn.autocommit = True
            conn.cursor().execute(f"CREATE SCHEMA {self.schema}")
        backend = POSTGRES_URL.replace("postgresql://", "postgresql+psycopg2://", 1)
        backend += ("&" if "?" in backend else "?") + f"options=-csearch_path%3D{self.schema}"
        port = _free_port()
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "--workers", "1", "--backend-store-uri", backend]
        cmd += ["--artifacts-destination", str(root / self.schema)]
        self.service = Service(cmd, root, _env())
        self.url = f"http://127.0.0.1:{port}"

    def uri(self) -> str:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return self.url
            except OSError:
                assert self.service.proc.poll() is None, self.service.output()
                assert time.monotonic() < deadline, "the MLflow server did not start"
                time.sleep(0.5)

    def close(self) -> None:
        import psycopg2

        self.service.stop()
        with contextlib.closing(psycopg2.connect(POSTGRES_URL)) as conn:
            conn.autocommit = True
            conn.cursor().execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """A function giving each test an empty tracking store: one MLflow server on PostgreSQL
    when FPL_TEST_POSTGRES_URL is set (started at once, while the reference runs; a test's
    runs are soft-deleted before the next test, so none is done for it), else a new SQLite
    file."""
    root = tmp_path_factory.mktemp("tracking")
    if not POSTGRES_URL:
        names = iter(range(100))
        yield lambda: f"sqlite:///{root / str(next(names))}.db"
        return
    server = TrackingServer("executors", root)

    def fresh() -> str:
        from mlflow.tracking import MlflowClient

        uri = server.uri()
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name("fpl-bench")
        if experiment is not None:
            for run in client.search_runs([experiment.experiment_id]):
                client.delete_run(run.info.run_id)
        return uri

    yield fresh
    server.close()


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    path = root / "cluster4.toml"
    path.write_text(SUITE)
    return path


def _start_reference(suite: Path, root: Path) -> subprocess.Popen:
    """The suite with `--executor local` (the numbers to match), in its own store."""
    args = ["run", "--suite", str(suite), "--out", str(root / "local")]
    args += ["--cache-dir", str(root / "cache")]
    return subprocess.Popen(
        _cli(*args), cwd=root, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _results(out: Path) -> pd.DataFrame:
    frame = pd.read_csv(out / "results.csv", dtype={"eps": str, "config_hash": str})
    return frame[COMPARED].sort_values(["method", "seed"]).reset_index(drop=True)


def interrupt_mid_run(out: Path, job: subprocess.Popen, sig: int) -> tuple[str, str]:
    """Send `sig` to the process running a cell once that cell has a checkpoint (a round
    done, the run not ended): the process named by the cell's lock file (OUT/locks/<cell>
    .lock, named like its checkpoint). Returns (the cell's file stem, the MLflow run its
    checkpoint continues)."""
    import torch

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and job.poll() is None:
        for checkpoint in sorted((out / "checkpoints").glob("*.pt")):
            lock = out / "locks" / f"{checkpoint.stem}.lock"
            words = lock.read_text().split() if lock.is_file() else []
            if len(words) < 2:
                continue
            try:
                run_id = torch.load(checkpoint, weights_only=True)["mlflow_run_id"]
                os.kill(int(words[1]), sig)
            except (OSError, RuntimeError, EOFError, KeyError):
                continue  # the run ended between the look and the signal: try another
            if checkpoint.is_file():  # interrupted before its end: the checkpoint stays
                return checkpoint.stem, run_id
        time.sleep(0.02)
    raise AssertionError("no run was caught between its first checkpoint and its end")


def assert_recorded_once(uri: str, out: Path, reference: pd.DataFrame, resumed: tuple) -> None:
    """results.csv equals the reference; the store has one finished run per cell; the
    interrupted cell's run is the one its checkpoint named (continued, not started again)."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    pd.testing.assert_frame_equal(_results(out), reference)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("fpl-bench")
    runs = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ACTIVE_ONLY)
    keys = [tuple(r.data.tags[c] for c in KEY) for r in runs]
    assert len(runs) == 4 and len(set(keys)) == 4, [(r.info.run_name, r.info.status) for r in runs]
    assert {r.info.status for r in runs} == {"FINISHED"}
    rows = pd.read_csv(out / "results.csv", dtype={"eps": str})
    assert set(rows["mlflow_run_id"]) == {r.info.run_id for r in runs}
    stem, run_id = resumed
    assert run_id in {r.info.run_id for r in runs}
    assert not (out / "checkpoints" / f"{stem}.pt").exists()


@pytest.fixture(scope="module")
def reference(suite_file, tracking, tmp_path_factory):
    """A function giving (folder, results) of the suite run with `--executor local`: the job
    starts at once and runs while a test starts its cluster."""
    root = tmp_path_factory.mktemp("reference")
    job = _start_reference(suite_file, root)
    done: list = []

    def result() -> tuple[Path, pd.DataFrame]:
        if not done:
            output, _ = job.communicate(timeout=600)
            assert job.returncode == 0, output.decode()
            done.append((root, _results(root / "local")))
        return done[0]

    yield result
    if job.poll() is None:
        job.kill()


def test_ray_two_nodes_a_killed_worker_loses_and_duplicates_nothing(
    suite_file, reference, tracking, tmp_path
):
    out = tmp_path / "ray"
    with ray_cluster(tmp_path) as address:
        uri = tracking()
        root, expected = reference()
        args = ["run", "--suite", str(suite_file), "--executor", "ray", "--address", address]
        args += ["--tracking-uri", uri, "--out", str(out), "--cache-dir", str(root / "cache")]
        job = subprocess.Popen(
            _cli(*args), cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            resumed = interrupt_mid_run(out, job, signal.SIGKILL)
            output, _ = job.communicate(timeout=600)
        finally:
            if job.poll() is None:
                job.kill()
    text = output.decode()
    assert job.returncode == 0, text
    assert "4 runs submitted to Ray" in text
    assert "resuming after round" in text  # the retry continued from the checkpoint
    assert_recorded_once(uri, out, expected, resumed)


def test_submitit_local_preempted_job_requeues_and_resumes(
    suite_file, reference, tracking, tmp_path
):
    pytest.importorskip("submitit")
    uri = tracking()
    run = _preempt_a_slurm_job(suite_file, reference, uri, tmp_path, 'backend = "local"', _env())
    _assert_requeued_and_resumed(run)
    assert_recorded_once(uri, run.out, run.expected, run.resumed)


@pytest.mark.skipif(not SLURM_CONF, reason="no Slurm: set FPL_TEST_SLURM_CONF (.ci/slurm.sh)")
def test_slurm_single_node_preempted_job_is_requeued_by_slurm(
    suite_file, reference, tracking, tmp_path
):
    """The same on a real slurmctld + slurmd: sbatch job arrays, `scontrol requeue`."""
    pytest.importorskip("submitit")
    env = {**_env(), "SLURM_CONF": str(SLURM_CONF)}
    settings = 'partition = "debug"\ncpus_per_task = 1\ngpus_per_node = 0'
    uri = tracking()
    run = _preempt_a_slurm_job(suite_file, reference, uri, tmp_path, settings, env, _start_requeued)
    _assert_requeued_and_resumed(run)
    assert_recorded_once(uri, run.out, run.expected, run.resumed)


class Preempted(NamedTuple):
    """What a pre-empted suite job left: its exit code and output, its Slurm logs, its output
    folder, the local reference results and the interrupted run."""

    returncode: int
    text: str
    logs: str
    out: Path
    expected: pd.DataFrame
    resumed: tuple


def _assert_requeued_and_resumed(run: Preempted) -> None:
    assert run.returncode == 0, run.text
    assert "4 runs submitted as 2 Slurm jobs" in run.text
    # the pre-empted job was requeued: submitit says so, or (when Slurm stops the step before
    # submitit's line is written, as it did once under load) slurmstepd does
    requeued = ("Requeued job", "DUE TO JOB REQUEUE")
    assert any(line in run.logs for line in requeued), run.logs[-3000:]
    assert "resuming after round" in run.logs


def _start_requeued(env: dict) -> None:
    """Slurm holds a requeued job for 2 minutes (its begin time); as an administrator may,
    start it now instead of waiting out the delay."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        queue_ = subprocess.run(
            ["squeue", "-h", "-o", "%i %r"], env=env, capture_output=True, text=True, check=True
        ).stdout.split("\n")
        held = [line.split()[0] for line in queue_ if line.endswith("BeginTime")]
        for job_id in held:
            subprocess.run(
                ["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=True
            )
        if held:
            return
        time.sleep(0.5)
    raise AssertionError("no requeued job was seen in the queue")


def _preempt_a_slurm_job(
    suite_file: Path,
    reference,
    uri: str,
    tmp_path: Path,
    settings: str,
    env: dict,
    after: Callable[[dict], None] | None = None,
) -> Preempted:
    """Run the suite as 2 array tasks of 2 runs, send SIGUSR1 (a pre-emption notice) to the
    process running a cell after its first checkpoint (the tests check that the job was
    requeued, and that the results are the local ones, each cell recorded once)."""
    root, expected = reference()
    out = tmp_path / "slurm"
    config = tmp_path / "cluster.toml"
    config.write_text(f"[slurm]\n{settings}\nruns_per_job = 2\ntime_min = 30\n")
    args = ["run", "--suite", str(suite_file), "--executor", "slurm"]
    args += ["--cluster-config", str(config), "--tracking-uri", uri, "--out", str(out)]
    args += ["--cache-dir", str(root / "cache")]
    job = subprocess.Popen(
        _cli(*args), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        resumed = interrupt_mid_run(out, job, signal.SIGUSR1)  # Slurm's pre-emption notice
        if after is not None:
            after(env)
        output, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    logs = "".join(p.read_text() for p in (out / "slurm").rglob("*.out"))
    logs += "".join(p.read_text() for p in (out / "slurm").rglob("*.err"))
    return Preempted(job.returncode, output.decode(), logs, out, expected, resumed)


def test_tune_workers_run_as_submitit_jobs(reference, tracking, tmp_path):
    """`tune --executor slurm`: the study's two workers are jobs (submitit's local backend),
    sharing the journal storage in OUT; each trial is counted once."""
    pytest.importorskip("submitit")
    import optuna

    root, _ = reference()
    uri = tracking()
    config = tmp_path / "cluster.toml"
    config.write_text('[slurm]\nbackend = "local"\ntime_min = 30\n')
    out = tmp_path / "tune"
    args = ["tune", "--methods", "promptfl", "--eps", "none", "--trials", "2", "--rounds", "2"]
    args += ["--trial-rounds", "1", "--eval-every", "1", "--last-k", "1", "--clients", "2"]
    args += ["--shots", "2", "--workers", "2", "--executor", "slurm"]
    args += ["--cluster-config", str(config), "--tracking-uri", uri, "--out", str(out)]
    args += ["--cache-dir", str(root / "cache")]
    for option in ("n_train_per_class=4", "n_test_per_class=2", "n_val_per_class=2"):
        args += ["--dataset-option", option]
    done = subprocess.run(
        _cli(*args), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 tuning workers submitted as 2 Slurm jobs" in done.stderr
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "optuna.journal"))
    )
    study = optuna.load_study(
        study_name="tune-promptfl-synthetic-base2novel-server-epsnone", storage=storage
    )
    assert len(study.trials) == 2 and all(t.state.is_finished() for t in study.trials)
    assert study.user_attrs["fpl.workers_joined"] == 2  # both jobs worked on the study
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)  # the workers logged to --tracking-uri
    experiment = client.get_experiment_by_name("fpl-bench-tune")
    names = [r.info.run_name for r in client.search_runs([experiment.experiment_id])]
    assert sorted(n for n in names if "-trial" in n) == [
        f"{study.study_name}-trial{i}" for i in (0, 1)
    ]
    assert "best hm=" in done.stdout
