"""The executor seam without a cluster: flags and cluster config, the cell lock, what the
tracking store says about a cell (done, abandoned, progress), the submitting side with a
stand-in executor, and the dry run's requests. The clusters themselves:
tests/test_executors_cluster.py."""

from __future__ import annotations

import math
import shutil
import socket
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from fpl_bench.errors import UsageError
from fpl_bench.executors.cells import CellResult, cell_lock, lock_path
from fpl_bench.executors.options import executor_choice
from tests.cli import run_cli

SUITE = """
name = "tiny4"
summary = "four cells"

[run]
rounds = 3
clients = 2
shots = 2

[[grid]]
methods = ["promptfl", "coop"]
datasets = ["synthetic"]
eps = ["none"]
seeds = [0, 1]
"""


@pytest.fixture
def suite_file(tmp_path):
    path = tmp_path / "tiny4.toml"
    path.write_text(SUITE)
    return path


@pytest.fixture(scope="module")
def migrated(tmp_path_factory):
    """An empty tracking database with MLflow's tables, made once (that takes seconds)."""
    from fpl_bench.tracking import Tracker

    root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        Tracker(root)
    return root / "mlflow.db"


@pytest.fixture
def store(tmp_path, monkeypatch, migrated):
    """An SQLite tracking store in OUT, as a local job would use (a copy of `migrated`)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from fpl_bench.tracking import Tracker

    out = tmp_path / "out"
    out.mkdir()
    shutil.copyfile(migrated, out / "mlflow.db")
    return out, Tracker(out)


def _cells(suite_file, out):
    from fpl_bench.suite import load_suite, suite_cells

    return suite_cells(load_suite(suite_file), out=out)


def _log_run(tracker, key, *, status="FINISHED", tag="finished", wall=None):
    """A run of `key` as `run_one` leaves it: key tags, and on its end a status tag."""
    run_id = tracker.start("x", {}, {k: str(v) for k, v in key.items()})
    if status != "RUNNING":
        metrics = {"final/local_acc": 0.5, **({"wall_s": wall} if wall else {})}
        tracker.finish(run_id, metrics, {}, status=status, tags={"status": tag})
    return run_id


# -- flags and config --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--executor", "nope"], "--executor nope: unknown; use one of local, ray, slurm"),
        (["--address", "h:6379"], "--address applies to --executor ray or slurm"),
        (["--executor", "ray", "--slurm-partition", "gpu"], "--slurm-partition does not apply"),
        (["--executor", "slurm", "--address", "h:1"], "--address does not apply"),
        (["--executor", "slurm", "--time-min", "0"], "slurm.time_min: Input should be greater"),
        (["--progress"], "--progress applies to --suite only"),
    ],
)
def test_bad_executor_flags_are_one_line_errors(args, needle, capsys, monkeypatch, tmp_path):
    code, _, err = run_cli(["run", *args, "--out", str(tmp_path)], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err


def test_an_address_no_ray_head_answers_is_refused_at_once(capsys, monkeypatch, tmp_path):
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["run", "--executor", "ray", "--address", f"127.0.0.1:{port}", "--out", str(tmp_path)]
    t0 = time.monotonic()
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2 and f"--address 127.0.0.1:{port}: no Ray head answers there" in err
    assert time.monotonic() - t0 < 10 and not list(tmp_path.iterdir())  # nothing prepared


def test_tune_takes_the_executor_flags(capsys, monkeypatch, tmp_path):
    args = ["tune", "--methods", "promptfl", "--trials", "1", "--executor", "ray"]
    code, _, err = run_cli([*args, "--time-min", "5"], capsys, monkeypatch)
    assert code == 2 and "--time-min does not apply to --executor ray" in err


def test_cluster_config_file_then_flags(tmp_path, monkeypatch):
    path = tmp_path / "cluster.toml"
    path.write_text('[slurm]\npartition = "a100"\ntime_min = 30\n\n[ray]\nnum_cpus = 2\n')
    chosen = executor_choice(executor="slurm", cluster_config=path, time_min=90)
    assert chosen.distributed
    assert (chosen.config.slurm.partition, chosen.config.slurm.time_min) == ("a100", 90)
    assert chosen.config.ray.num_cpus == 2
    monkeypatch.chdir(tmp_path)  # ./fpl-cluster.toml is read when no file is named
    (tmp_path / "fpl-cluster.toml").write_text("[ray]\nmax_retries = 7\n")
    assert executor_choice(executor="ray").config.ray.max_retries == 7
    path.write_text("[slurm]\nqueue = 'x'\n")
    with pytest.raises(UsageError, match=r"slurm.queue: Extra inputs .* docs/cluster.md"):
        executor_choice(executor="slurm", cluster_config=path)
    monkeypatch.setenv("FPL_BENCH_CLUSTER", str(tmp_path / "missing.toml"))
    with pytest.raises(UsageError, match="FPL_BENCH_CLUSTER"):
        executor_choice(executor="ray")


# -- the cell's lock ---------------------------------------------------------------------------
def test_cell_lock_waits_for_a_live_holder_and_names_it(tmp_path):
    key = {"method": "coop", "seed": 0}
    order, said = [], []
    with cell_lock(tmp_path, key, said.append):
        holder = lock_path(tmp_path, key).read_text()
        assert holder.startswith("pid ") and " host " in holder

        def second() -> None:
            with cell_lock(tmp_path, key, said.append):
                order.append("second")

        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        order.append("first done")
    thread.join(5)
    assert order == ["first done", "second"]
    assert said and said[0].startswith("waiting for pid ")
    assert lock_path(tmp_path, {"method": "coop", "seed": 1}) != lock_path(tmp_path, key)


# -- the tracking store by record key ----------------------------------------------------------
def test_done_and_abandoned_runs_are_found_by_their_key(store, suite_file):
    from fpl_bench.executors.records import abandoned_runs, done_keys, done_record
    from fpl_bench.suite import key_id

    out, tracker = store
    cells = _cells(suite_file, out)
    key, other = cells[0].key, cells[1].key
    failed = _log_run(tracker, key, status="FAILED", tag="failed")
    dead = _log_run(tracker, key, status="RUNNING")
    kept = _log_run(tracker, key, status="RUNNING")
    _log_run(tracker, other, status="RUNNING")
    assert done_record(tracker, key) is None
    assert sorted(abandoned_runs(tracker, key, keep=kept)) == sorted([failed, dead])
    tracker.finish(kept, {"final/local_acc": 0.75}, {}, tags={"status": "finished"})
    row = done_record(tracker, key)
    assert row["mlflow_run_id"] == kept and row["status"] == "finished"
    assert float(row["local_acc"]) == 0.75
    assert set(done_keys(tracker.uri)) == {key_id(key)}


def test_progress_counts_the_suites_cells_from_the_store(store, suite_file, capsys, monkeypatch):
    out, tracker = store
    cells = _cells(suite_file, out)
    _log_run(tracker, cells[0].key, wall=10.0)
    _log_run(tracker, cells[1].key, status="RUNNING")
    _log_run(tracker, cells[2].key, status="FAILED", tag="failed")
    args = ["run", "--suite", str(suite_file), "--progress", "--out", str(out)]
    code, text, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    # 3 cells left at the median 10 s, over 1 running
    assert "suite tiny4: 1/4 done, 1 running, 1 failed, 1 to do; ETA 30 s" in text
    assert "running: promptfl-synthetic-server-epsnone-seed1" in text


# -- the submitting side -----------------------------------------------------------------------
class StandIn:
    """An executor that runs nothing: each cell comes back finished with made-up numbers
    (or failed, for the cells named in `fail`)."""

    def __init__(self, fail: dict | None = None) -> None:
        self.seen: list = []
        self.fail = fail or {}

    def run(self, tasks, on_result, log):
        for task in tasks:
            self.seen.append(task)
            if task.label in self.fail:
                error, bad = self.fail[task.label]
                on_result(task, CellResult(task.key, "failed", error=error, bad_input=bad))
                continue
            row = {**task.key, "status": "finished", "local_acc": 0.5 + task.seed / 10}
            on_result(task, CellResult(task.key, "ran", row={**row, "mlflow_run_id": "r"}))


def test_a_cluster_job_skips_cells_done_anywhere_and_writes_results(store, suite_file):
    from fpl_bench.executors.dispatch import run_on_cluster
    from fpl_bench.suite import load_suite, pending_specs

    out, tracker = store
    cells = _cells(suite_file, out)
    done_id = _log_run(tracker, cells[0].key)  # finished on another machine
    specs = pending_specs(load_suite(suite_file), out)
    stand_in, said = StandIn(), []
    frame = run_on_cluster(
        specs, executor_choice(executor="ray"), log=said.append, executor=stand_in
    )
    assert len(stand_in.seen) == 3 and cells[0].key not in [t.key for t in stand_in.seen]
    assert all(t.spec.resume and Path(t.spec.out).is_absolute() for t in stand_in.seen)
    assert "1 of 4 runs done before" in said[0]
    assert len(frame) == 4 and frame["mlflow_run_id"].iloc[0] == done_id
    results = pd.read_csv(out / "results.csv")
    assert sorted(results["local_acc"].round(2)) == [0.5, 0.5, 0.6, 0.6]
    job = next((out / "jobs").glob("*.json")).read_text()
    assert '"status": "finished"' in job


@pytest.mark.parametrize(("bad_input", "raised"), [(True, UsageError), (False, RuntimeError)])
def test_failed_cells_fail_the_job_and_the_others_are_kept(store, suite_file, bad_input, raised):
    from fpl_bench.executors.dispatch import run_on_cluster
    from fpl_bench.suite import load_suite, pending_specs

    out, _ = store
    specs = pending_specs(load_suite(suite_file), out)
    failing = "coop-synthetic-server-epsnone-seed0"
    stand_in = StandIn(fail={failing: ("--data-root: no such folder", bad_input)})
    with pytest.raises(raised, match=f"1 of 4 runs failed \\(first: {failing}\\)"):
        run_on_cluster(specs, executor_choice(executor="slurm"), log=print, executor=stand_in)
    assert len(pd.read_csv(out / "results.csv")) == 3


def test_run_cell_returns_a_cell_done_elsewhere_without_running_it(store, suite_file):
    from fpl_bench.executors.cells import cell_tasks, run_cell

    out, tracker = store
    tasks = cell_tasks([_cells(suite_file, out)[0].spec], tracker.uri)
    done_id = _log_run(tracker, tasks[0].key)
    said = []
    result = run_cell(tasks[0], said.append)
    assert result.outcome == "skipped" and result.row["mlflow_run_id"] == done_id
    assert any("done before" in line for line in said)


# -- the dry run -------------------------------------------------------------------------------
def test_dry_run_shows_each_cells_request_and_the_gpu_hours(suite_file, capsys, monkeypatch):
    from fpl_bench.suite import dry_run_rows, load_suite

    args = ["run", "--suite", str(suite_file), "--dry-run", "--executor", "slurm"]
    code, text, err = run_cli([*args, "--gpus", "2", "--out", "unused"], capsys, monkeypatch)
    assert code == 0, err
    # runs that ask for GPUs are estimated at a GPU's rate, whatever this machine has
    rows = dry_run_rows(load_suite(suite_file), Path("unused"), device="cuda")
    here = dry_run_rows(load_suite(suite_file), Path("unused"), device="cpu")
    hours = 2 * sum(r["estimate_s"] for r in rows) / 3600
    assert sum(r["estimate_s"] for r in here) > 10 * sum(r["estimate_s"] for r in rows)
    assert "each run cpus=2, gpus=2, partition=(default), time_min=240" in text
    assert text.count("gpus=2  cpus=2") == 4
    assert "slurm: 4 array tasks of up to 1 runs" in text
    assert f"GPU-hours: {hours:.2f} for 4 runs to do" in text
    assert math.isfinite(hours) and hours > 0
