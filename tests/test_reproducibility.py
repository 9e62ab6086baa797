"""The same command and seed give the same results.csv in separate processes, whatever the
thread count (every column but wall time and the MLflow run id)."""

import subprocess
import sys

import pandas as pd
import pytest

ARGS = ["run", "--methods", "coop,dpfpl", "--eps", "none,1", "--rounds", "2", "--clients", "2"]
ARGS += ["--shots", "2", "--param", "dpfpl.rank=2"]
for _opt in ("n_train_per_class=4", "n_test_per_class=2", "n_val_per_class=2"):
    ARGS += ["--dataset-option", _opt]


@pytest.mark.slow
def test_same_command_same_results_across_processes_and_thread_counts(tmp_path):
    frames = []
    for threads in ("1", "2"):
        out = tmp_path / f"t{threads}"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "fpl_bench.cli",
                *ARGS,
                "--threads",
                threads,
                "--out",
                str(out),
                "--cache-dir",
                str(tmp_path / "cache"),
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr
        frame = pd.read_csv(out / "results.csv")
        frames.append(frame.drop(columns=["wall_s", "mlflow_run_id"]))
    pd.testing.assert_frame_equal(frames[0], frames[1])
