"""End to end through the CLI on the embedded default: results.csv and MLflow agree, accuracy
beats chance, and every private run spends at most its target epsilon."""

import math
import sys
from pathlib import Path

import pandas as pd
import pytest

from fpl_bench.cli import main
from tests.cli import run_main


# The job below runs once per module (~15 s on two cores) for the first test that takes it:
# every test that takes it is marked slow, so that `-m "not slow"` skips the job itself.
@pytest.fixture(scope="module")
def small_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("job")
    args = [
        "fpl-bench",
        "run",
        "--methods",
        "zeroshot,coop,promptfl",
        "--eps",
        "none,2",
        "--rounds",
        "3",
        "--eval-every",
        "1",
        "--clients",
        "4",
        "--shots",
        "4",
        "--last-k",
        "2",
        "--curve",  # every round's evaluation in MLflow (test_mlflow_runs_hold_the_same_numbers)
        "--out",
        str(out / "out"),
        "--cache-dir",
        str(out / "cache"),
    ]
    old = sys.argv
    sys.argv = args
    try:
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        sys.argv = old
    assert exc.value.code == 0
    return out / "out"


@pytest.mark.slow
def test_results_csv_has_one_row_per_method_eps_seed(small_job):
    frame = pd.read_csv(small_job / "results.csv")
    assert len(frame) == 6
    assert set(frame["method"]) == {"zeroshot", "coop", "promptfl"}
    for col in (
        "local_acc",
        "neighbor_acc",
        "base_acc",
        "novel_acc",
        "hm",
        "eps_target",
        "eps_spent",
    ):
        assert col in frame.columns
    assert (small_job / "partitions" / "synthetic-4c-seed0.json").is_file()


@pytest.mark.slow
def test_accuracy_beats_chance(small_job):
    frame = pd.read_csv(small_job / "results.csv")
    zs = frame[(frame.method == "zeroshot") & (frame.eps == "none")].iloc[0]
    assert zs.base_acc > 0.3 and zs.novel_acc > 0.3  # 32 classes each: chance 0.03
    coop = frame[(frame.method == "coop") & (frame.eps == "none")].iloc[0]
    assert coop.local_acc > 0.3


@pytest.mark.slow
def test_private_runs_spend_at_most_target(small_job):
    frame = pd.read_csv(small_job / "results.csv")
    private = frame[frame.eps != "none"]
    trained = private[private.method != "zeroshot"]
    assert (trained.eps_spent <= trained.eps_target + 1e-12).all()
    assert (trained.eps_spent > 0.5 * trained.eps_target).all()
    assert (trained.noise_multiplier > 0).all()


@pytest.mark.slow
def test_mlflow_runs_hold_the_same_numbers(small_job):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{small_job / 'mlflow.db'}")
    frame = pd.read_csv(small_job / "results.csv")
    for row in frame.itertuples():
        run = client.get_run(row.mlflow_run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["method"] == row.method
        for metric in ("local_acc", "base_acc", "novel_acc", "hm"):
            assert math.isclose(
                run.data.metrics[f"final/{metric}"], getattr(row, metric), rel_tol=1e-9
            )
        history = client.get_metric_history(row.mlflow_run_id, "round/local_acc")
        assert len(history) == (1 if row.method == "zeroshot" else 3)
        folder = run.data.tags["fpl_bench.artifacts"]  # relative to the output folder
        assert not Path(folder).is_absolute()
        assert (small_job / folder / "partition.json").is_file()


def test_a_diverged_run_is_recorded_as_such_and_the_job_goes_on(tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    args = ["fpl-bench", "run", "--methods", "coop,zeroshot", "--lr", "1e38", "--rounds", "1"]
    args += ["--clients", "2", "--shots", "2", "--out", str(out), "--cache-dir", str(tmp_path)]
    assert run_main(args[1:], monkeypatch) == 0
    frame = pd.read_csv(out / "results.csv")
    coop = frame[frame.method == "coop"].iloc[0]
    assert coop.status == "diverged" and math.isnan(coop.local_acc)
    assert frame[frame.method == "zeroshot"].iloc[0].status == "finished"
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    assert client.get_run(coop.mlflow_run_id).info.status == "FAILED"
    assert "diverged" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("protocol", "metrics"),
    [
        ("cross-domain", ("source_acc", "target_acc")),
        ("multi-domain", ("own_domain_acc", "other_domain_acc")),
    ],
)
def test_domain_protocols_run_on_synthetic_domains(tmp_path, monkeypatch, protocol, metrics):
    out = tmp_path / "out"
    args = ["fpl-bench", "run", "--methods", "zeroshot,coop", "--rounds", "1", "--shots", "2"]
    args += ["--protocol", protocol, "--partition", "by_domain", "--clients", "5"]
    if protocol == "cross-domain":  # one client per source domain: all five but the target
        args += ["--clients", "4", "--target-domain", "checker"]
    for option in ("domain=all", "n_train_per_class=4", "n_test_per_class=2", "n_val_per_class=2"):
        args += ["--dataset-option", option]
    args += ["--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert run_main(args[1:], monkeypatch) == 0
    frame = pd.read_csv(out / "results.csv")
    assert set(frame.status) == {"finished"}
    for metric in metrics:
        assert (frame[metric] > 1 / 64).all()  # 64 classes: far above chance


def test_cross_dataset_scores_the_trained_prompts_on_the_transfer_dataset(tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["fpl-bench", "run", "--methods", "zeroshot,coop", "--rounds", "1", "--shots", "2"]
    args += ["--clients", "2", "--protocol", "cross-dataset", "--transfer-datasets", "synthetic"]
    for option in ("domain=noise", "n_train_per_class=4", "n_test_per_class=2"):
        args += ["--dataset-option", option]
    args += ["--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert run_main(args[1:], monkeypatch) == 0
    frame = pd.read_csv(out / "results.csv").set_index("method")
    # zero-shot on the plain-background test set: the tiny CLIP is far above chance (1/64)
    assert frame.loc["zeroshot", "target_acc"] > 0.3
    assert frame.loc["coop", "target_acc"] > 1 / 64 and frame.loc["coop", "source_acc"] > 1 / 64


@pytest.mark.slow
def test_results_record_the_configuration(small_job):
    frame = pd.read_csv(small_job / "results.csv", dtype={"setup_hash": str, "config_hash": str})
    assert (frame.rounds == 3).all() and (frame.local_epochs == 2).all()
    assert (frame.batch_size == 32).all() and (frame.lr == 0.005).all()
    assert (frame.shots == 4).all() and (frame.clients == 4).all()
    assert (frame.backbone == "fpl-tiny-vit").all()
    assert not frame.secure_noise.any()  # seeded noise: regenerable from the recorded seed
    # one setup for the whole job; one configuration per method
    assert frame.setup_hash.nunique() == 1
    assert frame.groupby("method").config_hash.nunique().eq(1).all()
    assert frame.config_hash.nunique() == 3


def eval_prompts(small_job, prompts, monkeypatch, capsys, *extra):
    from tests.cli import run_cli

    args = ["eval", "--prompts", str(prompts), "--cache-dir", str(small_job.parent / "cache")]
    return run_cli([*args, *extra], capsys, monkeypatch)


@pytest.mark.slow
def test_saved_prompts_reproduce_the_last_evaluation(small_job, monkeypatch, capsys):
    import json

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{small_job / 'mlflow.db'}")
    frame = pd.read_csv(small_job / "results.csv")
    assert len(frame) == 6
    for row in frame.itertuples():
        prompts = small_job / row.prompts
        assert prompts.is_file() and prompts.parent.name == "prompts"
        code, out, err = eval_prompts(small_job, prompts, monkeypatch, capsys, "--json")
        assert code == 0, err
        metrics = json.loads(out)
        assert set(metrics) == {"local_acc", "neighbor_acc", "base_acc", "novel_acc", "hm"}
        for metric, value in metrics.items():  # the run's last evaluation, exactly
            last = client.get_metric_history(row.mlflow_run_id, f"round/{metric}")[-1]
            assert value == pytest.approx(last.value, abs=1e-12), (row.method, metric)


@pytest.mark.slow
def test_saved_prompts_are_mlflow_artifacts(small_job):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{small_job / 'mlflow.db'}")
    frame = pd.read_csv(small_job / "results.csv")
    for row in frame.itertuples():
        listed = {a.path for a in client.list_artifacts(row.mlflow_run_id)}
        assert {"prompts.safetensors", "partition.json", "history.json"} <= listed
        uri = client.get_run(row.mlflow_run_id).info.artifact_uri
        assert uri.startswith(f"file://{small_job.resolve()}/mlartifacts/")
        folder = small_job / client.get_run(row.mlflow_run_id).data.tags["fpl_bench.artifacts"]
        saved = (folder / "prompts.safetensors").read_bytes()
        assert saved == (small_job / row.prompts).read_bytes()


@pytest.mark.slow
def test_saved_prompts_hold_every_client_and_the_server(small_job):
    from fpl_bench.saved_prompts import load_prompts

    frame = pd.read_csv(small_job / "results.csv")
    promptfl = frame[(frame.method == "promptfl") & (frame.eps == "none")].iloc[0]
    saved = load_prompts(small_job / promptfl.prompts)
    assert len(saved.clients) == 4 and set(saved.server) == {"prompt"}
    assert saved.config["rounds"] == 3 and saved.config["method"] == "promptfl"
    assert saved.key["config_hash"] == promptfl.config_hash and saved.eval_round == 2
    coop = frame[(frame.method == "coop") & (frame.eps == "none")].iloc[0]
    personal = load_prompts(small_job / coop.prompts)
    assert personal.server == {} and len(personal.clients) == 4
    first, second = (personal.clients[i]["prompt"] for i in (0, 1))
    assert first.shape[0] == 16  # n_ctx context vectors
    assert not bool((first == second).all())  # each client trained its own prompt


@pytest.mark.slow
def test_saved_prompts_evaluate_under_another_protocol(small_job, monkeypatch, capsys):
    import json

    frame = pd.read_csv(small_job / "results.csv")
    coop = frame[(frame.method == "coop") & (frame.eps == "none")].iloc[0]
    code, out, err = eval_prompts(
        small_job,
        small_job / coop.prompts,
        monkeypatch,
        capsys,
        "--json",
        "--protocol",
        "personalized",
    )
    assert code == 0, err
    metrics = json.loads(out)
    assert set(metrics) == {"local_acc", "neighbor_acc"}
    assert all(0.03 < v <= 1 for v in metrics.values())  # 64 classes: chance 1.6%


@pytest.mark.slow
@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda p: p.write_bytes(b"\x00" * 64), "not a prompts file"),
        (lambda p: p.unlink(), "no such file"),
    ],
)
def test_eval_bad_prompts_file_one_line_exit_2(
    small_job, tmp_path, monkeypatch, capsys, damage, needle
):
    import shutil

    frame = pd.read_csv(small_job / "results.csv")
    copy = tmp_path / "p.safetensors"
    shutil.copy(small_job / frame.prompts.iloc[1], copy)
    damage(copy)
    code, _, err = eval_prompts(small_job, copy, monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


@pytest.mark.slow
def test_eval_refuses_prompts_of_another_shape(small_job, tmp_path, monkeypatch, capsys):
    from fpl_bench.saved_prompts import load_prompts, save_prompts

    frame = pd.read_csv(small_job / "results.csv")
    promptfl = frame[(frame.method == "promptfl") & (frame.eps == "none")].iloc[0]
    saved = load_prompts(small_job / promptfl.prompts)
    path = save_prompts(
        tmp_path / "cut.safetensors",
        server={"prompt": saved.server["prompt"][:4]},
        clients=saved.clients,
        config=saved.config,
        key=saved.key,
        eval_round=saved.eval_round,
        version=saved.version,
    )
    code, _, err = eval_prompts(small_job, path, monkeypatch, capsys)
    assert code == 2 and "server/prompt" in err and len(err.strip().splitlines()) == 1, err


def test_a_sqlite_tracking_uri_keeps_artifacts_beside_its_database(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI=sqlite:///DB: artifacts under DB's folder, none in the working
    directory (MLflow's default ./mlruns)."""
    from mlflow.tracking import MlflowClient

    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'tracking.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    args = ["run", "--methods", "zeroshot", "--clients", "2", "--shots", "2"]
    args += ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    assert run_main(args, monkeypatch) == 0
    run_id = pd.read_csv(tmp_path / "out" / "results.csv").mlflow_run_id.iloc[0]
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.artifact_uri.startswith(f"file://{store}/mlartifacts/")
    assert {a.path for a in client.list_artifacts(run_id)} >= {"prompts.safetensors"}
    assert (store / "mlartifacts" / run_id / "artifacts" / "partition.json").is_file()
    assert list(workdir.iterdir()) == []


def test_the_printed_table_says_the_configuration(tmp_path, capsys, monkeypatch):
    args = ["run", "--methods", "zeroshot", "--clients", "2", "--shots", "2", "--rounds", "3"]
    args += ["--lr", "0.01", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path)]
    assert run_main(args, monkeypatch) == 0
    out = capsys.readouterr().out
    line = "3 rounds x 2 local epochs, batch 32, lr 0.01, 2 clients, 2 shots, backbone fpl-tiny-vit"
    assert line in out.splitlines()
