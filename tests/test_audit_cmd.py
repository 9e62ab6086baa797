"""`fpl-bench audit` end to end at a tiny size: run's flags, both trust models into one OUT,
audit.csv with one row per method x eps x trust x seed x attack and an MLflow run for each;
a second audit reuses the runs and the rows; bad input is one line and exit 2; and an overfit
non-private run is attacked well above chance."""

from __future__ import annotations

import pandas as pd
import pytest

from fpl_bench.audit import AUDIT_COLUMNS, AUDIT_EXPERIMENT, canary_row
from fpl_bench.privacy.canary_audit import AuditSetting, Variant, run_canary_audit
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
        for a in ("loss", "shadow", "canary")
        if a != "canary" or e != "none"  # no DP: nothing to bound
    }
    assert len(frame) == 20
    mia, canary = frame[frame.attack != "canary"], frame[frame.attack == "canary"]
    for column in ("balanced_acc", "auc", "tpr_at_1fpr"):
        assert mia[column].between(0, 1).all(), column
        assert canary[column].isna().all(), column
    assert (mia.n_members == 128).all() and (mia.n_nonmembers == 128).all()
    assert (mia.nonmembers == "train").all() and (canary.nonmembers == "canaries").all()
    assert mia.eps_lower.isna().all()
    # the correct mechanism's one-run bound stays below its target, from 1000 canaries
    assert canary.eps_lower.between(0, 1.0, inclusive="left").all()
    assert (canary.guesses > 0).all() and (canary.correct <= canary.guesses).all()
    assert (frame.shadow_runs == frame.attack.map({"loss": 0, "shadow": 1, "canary": 0})).all()
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
        if row.attack == "canary":
            assert run.data.metrics["eps_lower"] == pytest.approx(row.eps_lower)
        else:
            assert run.data.metrics["auc"] == pytest.approx(row.auc)
        assert run.data.tags["attack"] == row.attack and run.data.tags["trust"] == row.trust

    # again: nothing is trained or attacked anew
    code, _, err = run_cli([*common, "--trust", "client"], capsys, monkeypatch)
    assert code == 0, err
    assert "done by an earlier audit; kept" in err
    assert len(client.search_runs([experiment.experiment_id])) == 20
    again = pd.read_csv(out / "audit.csv", dtype={"eps": str})
    pd.testing.assert_frame_equal(again, frame)


def tiny_audit(tmp_path, capsys, monkeypatch, methods, eps, attacks):
    """`fpl-bench audit` of `methods` at `eps` with `attacks` on the tiny federation into
    tmp_path/out: (exit code, stdout, stderr, the output folder)."""
    out = tmp_path / "out"
    args = ["audit", "--methods", methods, "--eps", eps, "--attacks", attacks, *TINY]
    args += ["--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    return (*run_cli(args, capsys, monkeypatch), out)


def test_a_private_run_that_trains_nothing_gets_no_canary_bound(tmp_path, capsys, monkeypatch):
    code, _, err, out = tiny_audit(tmp_path, capsys, monkeypatch, "zeroshot", "1", "loss,canary")
    assert code == 0, err
    assert "no noisy step (no DP, or nothing trained); canary attack not run" in err
    frame = pd.read_csv(out / "audit.csv")
    assert list(frame.attack) == ["loss"]


def test_the_input_canary_attack_bounds_every_run_from_one_more_run(tmp_path, capsys, monkeypatch):
    code, stdout, err, out = tiny_audit(tmp_path, capsys, monkeypatch, "coop", "none,1", "input")
    assert code == 0, err
    assert "input canaries: eps >=" in err
    shown = [line.split() for line in stdout.splitlines() if " input " in line]
    assert len(shown) == 2 and all(float(cells[-1]) >= 0 for cells in shown)  # its eps >=
    frame = pd.read_csv(out / "audit.csv", dtype={"eps": str}).set_index("eps")
    assert set(frame.attack) == {"input"} and set(frame.index) == {"none", "1.0"}
    assert frame.nonmembers.str.startswith("canaries").all()
    # every undealt training example of the seen classes is a canary (fewer than 1000 here)
    assert (frame.n_members + frame.n_nonmembers).nunique() == 1
    assert frame.n_members.gt(0).all() and frame.n_nonmembers.gt(0).all()
    assert frame.auc.between(0, 1).all()
    assert frame.loc["1.0", "eps_lower"] <= 1.0
    assert frame.eps_lower.notna().all() and (frame.correct <= frame.guesses).all()
    # the canary run is the audit's own: results.csv holds the accuracy runs only
    assert len(pd.read_csv(out / "results.csv")) == 2


BAD = {  # flags -> what the one line says
    "--attacks loss,bogus": "--attacks loss,bogus: unknown attack; known: loss, shadow, canary, input",
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


RUN = {  # a finished private run's results.csv fields that the canary attack reads
    "eps_target": 1.0, "delta": 1e-5, "clip_norm": 1.0, "sample_rate": 32 / 48, "steps": 20,
    "clients": 10, "trust": "server", "seed": 0,
}  # fmt: skip


def test_the_canary_attack_audits_the_run_mechanism_at_its_settings():
    """The embedded suite's client (q = 32/48, 20 noisy steps, 10 clients) at eps 1: the
    one-run bound from 1000 canaries is 0.244 (31 of 40 guesses right), below the target."""
    row = canary_row(RUN, momentum=0.9)
    setting = AuditSetting(
        canaries=1000, dim=1024, steps=20, sample_rate=32 / 48, clients=10, eps=1.0,
        delta=1e-5, clip_norm=1.0, momentum=0.9,
    )  # fmt: skip
    expected = run_canary_audit(setting, Variant.CORRECT, "server", seed=0).bound
    assert row["eps_lower"] == expected.epsilon == pytest.approx(0.2436238, abs=1e-6)
    assert (row["guesses"], row["correct"]) == (expected.guesses, expected.correct) == (40, 31)
    assert row["nonmembers"] == "canaries" and pd.isna(row["balanced_acc"])
    assert canary_row({**RUN, "eps_target": float("nan")}, momentum=0.9) is None
