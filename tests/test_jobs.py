"""Job records in OUT/jobs/: ISO times, a failed job's reason, none for input refused early."""

import json
from datetime import datetime

import pytest

from fpl_bench.errors import UsageError
from fpl_bench.jobs import Job
from tests.cli import run_cli


def read(job: Job) -> dict:
    return json.loads(job.path.read_text())


def test_record_times_are_iso_with_offset(tmp_path):
    job = Job(tmp_path, argv=["fpl-bench", "run"])
    assert read(job)["status"] == "running" and read(job)["ended"] is None
    job.end("finished")
    record = read(job)
    started, ended = (datetime.fromisoformat(record[k]) for k in ("started", "ended"))
    assert started.tzinfo is not None and ended >= started
    assert record["status"] == "finished" and record["reason"] is None


def test_a_failed_job_records_the_errors_line(tmp_path):
    job = Job(tmp_path, argv=["fpl-bench", "run"])
    job.fail(RuntimeError("CUDA out of memory\nTried to allocate 2 GiB"))
    assert (read(job)["status"], read(job)["reason"]) == (
        "failed",
        "RuntimeError: CUDA out of memory",
    )
    job = Job(tmp_path, argv=["fpl-bench", "run"])
    job.add_run("run-1")
    job.fail(UsageError("data root /x has no caltech-101"))  # after a run: the job had started
    assert (read(job)["status"], read(job)["reason"]) == (
        "failed",
        "data root /x has no caltech-101",
    )


def test_input_refused_before_any_run_leaves_no_record(tmp_path):
    job = Job(tmp_path, argv=["fpl-bench", "run"])
    job.fail(UsageError("--shots 500: more than the data has"))
    assert not job.path.exists()


@pytest.mark.parametrize("args", [["--shots", "500"], ["--methods", "coop@global_local"]])
def test_refused_run_leaves_no_job_record(args, capsys, monkeypatch, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["run", "--out", str(out), "--cache-dir", str(tmp_path / "c"), *args], capsys, monkeypatch
    )
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not list(out.glob("jobs/*.json"))
