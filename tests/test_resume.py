"""A run killed with SIGKILL (between rounds, or while writing its checkpoint) and resumed with
--resume gives the same results as an uninterrupted run; SIGTERM stops cleanly."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest

pytestmark = pytest.mark.slow  # each test runs and kills CLI jobs in child processes

ARGS = ["run", "--methods", "coop,dpfpl", "--eps", "1", "--rounds", "3", "--clients", "2"]
ARGS += ["--shots", "2", "--eval-every", "1", "--last-k", "2", "--param", "dpfpl.rank=2"]
for _opt in ("n_train_per_class=4", "n_test_per_class=2", "n_val_per_class=2"):
    ARGS += ["--dataset-option", _opt]
COMPARED = ["method", "eps", "seed", "config_hash", "status", "local_acc", "neighbor_acc"]
COMPARED += ["base_acc", "novel_acc", "hm", "eps_spent", "noise_multiplier", "steps"]

# Run the CLI in a child that SIGKILLs itself at its KILL_AT-th checkpoint write: after the
# temp file is written and before it is renamed (a kill "during the checkpoint write"). Two
# runs of 3 rounds write 6 checkpoints: 2 kills the first run after round 1, 5 the second
# run after round 1, with the first run finished (skipped on resume).
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    kill_at = int(os.environ["KILL_AT"])
    real_replace, seen = os.replace, [0]
    def replace(src, dst):
        if "checkpoints" in str(dst):
            seen[0] += 1
            if seen[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
    os.replace = replace
    from fpl_bench.cli import main
    sys.argv = ["fpl-bench", *sys.argv[1:]]
    main()
    """
)


def _cli(args, cwd, env=None, child=False):
    cmd = [sys.executable, "-c", CHILD, *args] if child else [sys.executable, "-m"]
    if not child:
        cmd += ["fpl_bench.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _results(out):
    frame = pd.read_csv(out / "results.csv", dtype={"eps": str})
    return frame[COMPARED].sort_values(["method", "eps"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    cache = ["--cache-dir", str(root / "cache")]
    done = _cli([*ARGS, *cache, "--out", str(root / "out")], root)
    assert done.returncode == 0, done.stderr
    return root, _results(root / "out")


@pytest.mark.parametrize("kill_at", [2, 5])
def test_sigkill_then_resume_equals_an_uninterrupted_run(reference, tmp_path, kill_at):
    root, expected = reference
    out = tmp_path / "out"
    args = [*ARGS, "--cache-dir", str(root / "cache"), "--out", str(out)]
    env = {**os.environ, "KILL_AT": str(kill_at)}
    killed = _cli(args, tmp_path, env=env, child=True)
    assert killed.returncode == -signal.SIGKILL
    assert list((out / "checkpoints").glob("*.pt"))  # the last complete round was kept
    resumed = _cli([*args, "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    pd.testing.assert_frame_equal(_results(out), expected)
    assert not list((out / "checkpoints").glob("*.pt"))
    # the interrupted MLflow run was continued, not duplicated
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs(client.get_experiment_by_name("fpl-bench").experiment_id)
    assert len(runs) == len(expected)
    assert {r.info.status for r in runs} == {"FINISHED"}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_stops_with_one_line_and_marks_the_run_killed(reference, tmp_path, workers):
    """In one process, and with the runs in worker processes (the parent stops them)."""
    root, _ = reference
    out = tmp_path / "out"
    args = [*ARGS, "--rounds", "30", "--cache-dir", str(root / "cache"), "--out", str(out)]
    args += ["--workers", workers]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fpl_bench.cli", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 600
    in_flight = int(workers)  # with 2 workers, wait until both runs have a checkpoint
    while len(list((out / "checkpoints").glob("*.pt"))) < in_flight and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err and "--resume" in err.strip().splitlines()[-1]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs(client.get_experiment_by_name("fpl-bench").experiment_id)
    assert "KILLED" in {r.info.status for r in runs}
    assert "RUNNING" not in {r.info.status for r in runs}
    if workers == "2":  # both runs were in flight in their workers, and both were stopped
        assert [r.info.status for r in runs] == ["KILLED", "KILLED"]
