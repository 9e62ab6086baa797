"""`fpl-bench audit` end to end at a tiny size: run's flags, both trust models into one OUT,
audit.csv with one row per method x eps x trust x seed x attack and an MLflow run for each;
a second audit reuses the runs and the rows; bad input is one line and exit 2; and an overfit
non-private run is attacked well above chance."""

from __future__ import annotations

import pandas as pd
import pytest

from fpl_bench.audit import AUDIT_COLUMNS, AUDIT_EXPERIMENT
from tests.cli import run_cli

TINY = [
    "--rounds", "1", "--local-epochs", "1", "--clients", "2", "--shots", "4",
    "--dataset-option", "n_train_per_class=8",
    "--dataset-option", "n_test_per_class=4",
]  # fmt: skip


@pytest.mark.slow
def test_audit_writes_a_row_per_method_eps_trust_seed_attack(tmp_path, capsys, monkeypatch):
    out, cache = tmp_path / "out", tmp_path / "cache"
    common = [
        "audit", "--methods", "coop,dpfpl", "--eps", "none,1", "--seeds", "0",
        "--shadow-runs", "1", *TINY, "--out", str(out), "--cache-dir", str(cache),
    ]  # fmt: skip
    for trust in ("server", "client"):
        code, stdout, err = run_cli([*common, "--trust", trust], capsys, monkeypatch)
        assert code == 0, err
        assert "membership inference on synthetic" in stdout
    frame = pd.read_csv(out / "audit.csv", dtype={"eps": str})
    assert list(frame.columns) == list(AUDIT_COLUMNS)
    cells = set(zip(frame.method, frame.eps, frame.trust, frame.seed, frame.attack, strict=True))
    assert cells == {
        (m, e, t, 0, a)
        for m in ("coop", "dpfpl")
        for e in ("none", "1.0")
        for t in ("server", "client")
        for a in ("loss", "shadow")
    }
    assert len(frame) == 16
    for column in ("balanced_acc", "auc", "tpr_at_1fpr"):
        assert frame[column].between(0, 1).all(), column
    assert (frame.n_members == 128).all() and (frame.n_nonmembers == 128).all()
    assert (frame.nonmembers == "train").all()
    assert (frame.shadow_runs == frame.attack.map({"loss": 0, "shadow": 1})).all()
    # the audited runs are results.csv's: seed 0, plus seed 1 as the shadow run
    results = pd.read_csv(out / "results.csv")
    assert set(frame.run_id) == set(results[results.seed == 0].mlflow_run_id)
    assert set(results.seed) == {0, 1}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(AUDIT_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert {r.info.run_id for r in runs} == set(frame.mlflow_run_id)
    by_id = {r.info.run_id: r for r in runs}
    for row in frame.itertuples():
        run = by_id[row.mlflow_run_id]
        assert run.data.metrics["auc"] == pytest.approx(row.auc)
        assert run.data.tags["attack"] == row.attack and run.data.tags["trust"] == row.trust

    # again: nothing is trained or attacked anew
    code, _, err = run_cli([*common, "--trust", "client"], capsys, monkeypatch)
    assert code == 0, err
    assert "done by an earlier audit; kept" in err
    assert len(client.search_runs([experiment.experiment_id])) == 16
    again = pd.read_csv(out / "audit.csv", dtype={"eps": str})
    pd.testing.assert_frame_equal(again, frame)


BAD = {  # flags -> what the one line says
    "--attacks loss,bogus": "--attacks loss,bogus: unknown attack; known: loss, shadow",
    "--shadow-runs -1": "--shadow-runs -1: must be 0 or more",
    "--shadow-runs 0": "the shadow attack needs runs under other seeds",
    "--seeds 0,x": "--seeds 0,x: expected comma-separated integers",
    "--clients 0": "--clients 0:",
}


@pytest.mark.parametrize("flags", sorted(BAD))
def test_bad_input_is_one_line_exit_2(flags, tmp_path, capsys, monkeypatch):
    args = ["audit", *flags.split(), "--out", str(tmp_path / "out")]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2
    assert BAD[flags] in err and len(err.strip().splitlines()) == 1, err


def test_an_audit_file_of_another_kind_is_refused_before_training(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "audit.csv").write_text("method,eps\ncoop,none\n")
    args = ["audit", "--methods", "coop", "--attacks", "loss", "--out", str(out)]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2 and "audit.csv lacks the columns" in err, err
    assert not (out / "results.csv").exists()


@pytest.mark.slow
def test_an_overfit_run_is_attacked_above_chance(tmp_path, capsys, monkeypatch):
    """CoOp alone on one shot per class over a CLIP of random weights (--pretrained none),
    trained far past its fit: its features carry no class, so what it learns is its training
    images (about 48% of them right against 11% of the others). The loss attack's AUC is about
    0.82 over 64 members and 64 non-members (standard error about 0.05 under no signal)."""
    args = [
        "audit", "--methods", "coop", "--eps", "none", "--seeds", "0", "--attacks", "loss",
        "--pretrained", "none", "--protocol", "personalized", "--rounds", "1",
        "--local-epochs", "200", "--lr", "0.1", "--clients", "2", "--shots", "1",
        "--dataset-option", "n_train_per_class=8", "--dataset-option", "n_test_per_class=4",
        "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    row = pd.read_csv(tmp_path / "out" / "audit.csv").iloc[0]
    assert (row.n_members, row.n_nonmembers) == (64, 64)
    assert row.auc > 0.7, row.auc  # chance: 0.5
