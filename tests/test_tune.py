"""fpl-bench tune: studies on the validation split, pruning, failed trials, MLflow nesting,
storages (sqlite, journal, PostgreSQL), heartbeat retry of a killed worker, run --tuned inputs.

Most tests replace the federated run by a function of the learning rate (`fake_train`), so a
study of eight trials takes a second; `test_tiny_study_end_to_end` and the worker tests run
the real thing on a tiny synthetic set. The PostgreSQL tests need a server: set
FPL_TEST_POSTGRES_URL (`.ci/postgres.sh` starts one and prints the URL).
"""

import math
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from fpl_bench import tune
from fpl_bench.catalog import SearchRange, preset_cards, resolve_method
from fpl_bench.errors import UsageError
from fpl_bench.spec import ExperimentSpec, build_spec
from fpl_bench.tune import objective, space
from tests.cli import run_cli

TINY = [
    "--clients", "2", "--shots", "4", "--threads", "1",
    "--dataset-option", "n_train_per_class=8",
    "--dataset-option", "n_test_per_class=4",
    "--dataset-option", "n_val_per_class=4",
]  # fmt: skip
POSTGRES_URL = os.environ.get("FPL_TEST_POSTGRES_URL")
needs_postgres = pytest.mark.skipif(
    not POSTGRES_URL,
    reason="no PostgreSQL server: set FPL_TEST_POSTGRES_URL (.ci/postgres.sh prints one)",
)


def assert_one_line_error(code, err, needle):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


# -- storages ----------------------------------------------------------------------------------
def test_storage_defaults_sqlite_for_one_worker_journal_for_several(tmp_path):
    one = tune.parse_storage(None, out=tmp_path, workers=1)
    assert one.kind == "sqlite" and one.location == f"sqlite:///{tmp_path.resolve()}/optuna.db"
    many = tune.parse_storage(None, out=tmp_path, workers=3)
    assert many.kind == "journal" and many.file == tmp_path.resolve() / "optuna.journal"
    pg = tune.parse_storage("postgres://u:pw@h:5/db", out=tmp_path, workers=4)
    assert pg.kind == "postgresql" and pg.location == "postgresql://u:pw@h:5/db"
    assert pg.shown == "postgresql://u:***@h:5/db"


def test_study_lock_and_optuna_journal_lock_are_different_files(tmp_path):
    """Optuna's journal backend locks PATH.lock with a file it creates and, after 30 s of
    finding it there, deletes; StudyLock held over a study's creation must not be that file."""
    target = tune.parse_storage(None, out=tmp_path, workers=2)
    assert target.kind == "journal"
    with tune.StudyLock(target):
        t0 = time.monotonic()
        optuna.create_study(storage=tune.open_storage(target), study_name="s")
        assert time.monotonic() - t0 < 10
    assert Path(tune.lock_path(target.file)).is_file()
    assert not Path(f"{target.file}.lock").exists()


@pytest.mark.parametrize(
    ("storage", "workers", "needle"),
    [
        ("mysql://u:secret@h/db", 1, "unknown storage 'mysql'"),
        ("redis://h:6379", 1, "unknown storage 'redis'"),
        ("study.db", 1, "unknown storage 'study.db'"),
        ("sqlite:///x.db", 2, "SQLite is for one worker"),
    ],
)
def test_bad_storage_is_one_line_exit_2(storage, workers, needle, capsys, monkeypatch, tmp_path):
    args = ["tune", "--methods", "promptfl", "--trials", "2", "--out", str(tmp_path)]
    args += ["--storage", storage, "--workers", str(workers)]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert_one_line_error(code, err, needle)
    assert "secret" not in err


def test_unreachable_database_is_one_line_exit_2_fast(capsys, monkeypatch, tmp_path):
    args = ["tune", "--methods", "promptfl", "--trials", "2", "--out", str(tmp_path)]
    args += ["--storage", "postgresql://fpl:secret@127.0.0.1:9/nowhere"]
    t0 = time.perf_counter()
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert_one_line_error(code, err, "cannot connect")
    assert "secret" not in err and "fpl:***@127.0.0.1:9" in err
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "mlflow.db").exists()


# -- search spaces -----------------------------------------------------------------------------
def test_card_without_search_table_cannot_be_tuned(capsys, monkeypatch, tmp_path):
    args = ["tune", "--methods", "zeroshot", "--trials", "2", "--out", str(tmp_path)]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert_one_line_error(code, err, "zeroshot cannot be tuned")


def test_pair_without_card_cannot_be_tuned(capsys, monkeypatch, tmp_path):
    args = ["tune", "--methods", "coop@fedavg", "--trials", "2", "--out", str(tmp_path)]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert_one_line_error(code, err, "coop@fedavg cannot be tuned")


def patch_search(monkeypatch, method: str, search: dict[str, SearchRange]) -> None:
    cards = dict(preset_cards())
    cards[method] = cards[method].model_copy(update={"search": search})
    monkeypatch.setattr(space, "preset_cards", lambda: cards)  # where search_space looks it up


@pytest.mark.parametrize(
    ("search", "needle"),
    [
        ({"lr": SearchRange.model_construct(low=0.1, high=0.001, log=True)}, "low 0.1 > high"),
        ({"local_epochs": SearchRange(low=1.5, high=3)}, "integer option"),
        ({"lr": SearchRange(low=-1.0, high=0.1)}, "lr"),
        ({"scheme.rank": SearchRange(choices=[0, 4])}, "must be >= 1"),
    ],
)
def test_bad_search_range_is_one_line_exit_2(search, needle, capsys, monkeypatch, tmp_path):
    patch_search(monkeypatch, "dpfpl", search)
    args = ["tune", "--methods", "dpfpl", "--trials", "2", "--out", str(tmp_path)]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert_one_line_error(code, err, needle)
    assert "dpfpl.toml [search]" in err


def test_suggest_stays_in_the_card_ranges():
    params = tune.search_space("dpfpl")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        values = tune.suggest(study.ask(), params)
        run, overrides = tune.split_values(values)
        assert 0.0005 <= run["lr"] <= 0.1
        assert overrides["scheme.rank"] in (1, 2, 4, 8)
        assert resolve_method("dpfpl", overrides).scheme_options["rank"] == overrides["scheme.rank"]


def test_worker_samplers_are_seeded_apart():
    assert tune.sampler_seed(0, 0) == tune.sampler_seed(0, 0)
    seeds = {tune.sampler_seed(s, w) for s in range(3) for w in range(4)}
    assert len(seeds) == 12


def test_tally_counts_a_retried_trial_once():
    study = optuna.create_study()
    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1.0)}
    study.add_trial(
        optuna.create_trial(state=TrialState.FAIL, params={"lr": 0.1}, distributions=dist)
    )
    study.add_trial(optuna.create_trial(value=0.5, params={"lr": 0.2}, distributions=dist))
    retry = {"failed_trial": 0, "retry_history": [0]}
    study.add_trial(
        optuna.create_trial(
            state=TrialState.WAITING, params={"lr": 0.1}, distributions=dist, system_attrs=retry
        )
    )
    count = tune.tally(study)
    assert (count.ended, count.running, count.waiting) == (1, 0, 1)
    assert count.claimable(2) and count.claimable(1)  # a queued retry always runs
    assert not tune.Tally(ended=2, running=0, waiting=0, states={}).claimable(2)
    assert not tune.Tally(ended=1, running=1, waiting=0, states={}).claimable(2)


# -- trials with a fake federated run ------------------------------------------------------------
@dataclass
class FakePrep:
    spec: Any
    tower: Any = None


def score(lr: float, round_no: int) -> float:
    """A validation metric that peaks at lr = 0.01 and grows with rounds."""
    return max(0.0, 0.9 - 0.1 * abs(math.log10(lr) + 2)) * (0.5 + 0.1 * round_no)


def fake_train(prep, fed, choice, eps, seed, on_eval, *, trial_rounds=None, plans=None):
    history = []
    for round_no in range(1, (trial_rounds or prep.spec.rounds) + 1):
        value = score(prep.spec.lr, round_no)
        metrics = {"round": round_no, "local_acc": value, "neighbor_acc": value}
        metrics.update({"base_acc": value, "novel_acc": value, "hm": value})
        history.append(metrics)
        if on_eval:
            on_eval(round_no, metrics)
    return history, None


@pytest.fixture
def fake_runs(monkeypatch):
    """No data, no training: prepare/federation are stubs and a trial's run is `fake_train`."""
    import fpl_bench.prepare as prepare

    monkeypatch.setattr(prepare, "prepare", lambda spec, log=print: FakePrep(spec))
    monkeypatch.setattr(prepare, "federation", lambda prep, seed: None)
    monkeypatch.setattr(objective, "train_seed", fake_train)  # where Objective looks it up


def make_job(tmp_path, trials=8, **fields):
    base = dict(
        methods=(resolve_method("promptfl"),), eps=(0.5,), rounds=6, eval_every=1, last_k=2,
        eval_split="val", out=tmp_path / "out", cache_dir=tmp_path / "cache",
    )  # fmt: skip
    spec = build_spec(**{**base, **fields})
    storage = tune.parse_storage(None, out=spec.out)
    tune.check_storage(storage)
    return tune.TuneJob(spec=spec, trials=trials, storage=storage, trial_rounds=4)


def load(job):
    choice, eps = job.cells()[0]
    return optuna.load_study(study_name=job.name(choice, eps), storage=job.storage.location)


def test_objective_is_last_k_mean_and_weak_trials_are_pruned(tmp_path, fake_runs):
    job = make_job(tmp_path)
    lines = tune.run_worker(job, log=lambda s: None)
    study = load(job)
    assert len(study.trials) == 8 and tune.tally(study).ended == 8
    states = {t.state for t in study.trials}
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        lr = trial.params["lr"]
        assert trial.value == pytest.approx((score(lr, 3) + score(lr, 4)) / 2)  # last 2 of 4
        assert max(trial.intermediate_values) == 4  # trained the trial rounds, not all 6
    for trial in study.get_trials(states=(TrialState.PRUNED,)):
        assert trial.user_attrs["pruned_at"] < 4
    assert study.best_trial.params == tune.best_params(job.storage, study.study_name)
    assert "best hm=" in lines[0]


def test_trials_are_mlflow_runs_nested_under_the_study_run(tmp_path, fake_runs):
    from mlflow.tracking import MlflowClient

    from fpl_bench.tracking import tracking_uri

    job = make_job(tmp_path, trials=4)
    tune.run_worker(job, log=lambda s: None)
    client = MlflowClient(tracking_uri(job.spec.out))
    experiment = client.get_experiment_by_name(tune.EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("fpl.role") == "study"]
    children = [r for r in runs if r.data.tags.get("fpl.role") == "trial"]
    assert len(parents) == 1 and len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == [0, 1, 2, 3]
    status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
    for run in children:
        assert run.info.status == status[run.data.tags["optuna.state"]]
        assert "lr" in run.data.params
    assert parents[0].info.status == "FINISHED" and "best.lr" in parents[0].data.tags


def test_diverged_trial_is_failed_and_the_study_goes_on(tmp_path, fake_runs, monkeypatch):
    from fpl_bench.driver import Diverged

    def diverge_at_high_lr(prep, fed, choice, eps, seed, on_eval, **kw):
        if prep.spec.lr > 0.01:
            raise Diverged(1)
        return fake_train(prep, fed, choice, eps, seed, on_eval, **kw)

    monkeypatch.setattr(objective, "train_seed", diverge_at_high_lr)
    job = make_job(tmp_path, trials=6)
    tune.run_worker(job, log=lambda s: None)
    study = load(job)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert failed and all(t.params["lr"] > 0.01 for t in failed)
    assert all(t.user_attrs["status"] == "diverged" for t in failed)
    assert tune.tally(study).ended == 6


def test_rerun_extends_a_study_and_other_settings_are_refused(tmp_path, fake_runs):
    tune.run_worker(make_job(tmp_path, trials=3), log=lambda s: None)
    tune.run_worker(make_job(tmp_path, trials=5), log=lambda s: None)
    assert len(load(make_job(tmp_path)).trials) == 5
    with pytest.raises(UsageError, match="was tuned with clients=10, not 4"):
        tune.run_worker(make_job(tmp_path, trials=6, clients=4), log=lambda s: None)


@pytest.mark.skipif(
    "tuned" not in ExperimentSpec.model_fields,
    reason="ExperimentSpec has no `tuned` field yet (added with `fpl-bench run --tuned`)",
)
def test_tuned_specs_take_each_study_best(tmp_path, fake_runs):
    job = make_job(tmp_path, trials=6)
    tune.run_worker(job, log=lambda s: None)
    best = load(job).best_trial.params
    spec = build_spec(
        methods=(resolve_method("zeroshot"), resolve_method("promptfl")), eps=(0.5,),
        out=tmp_path / "out",
    )  # fmt: skip
    specs = tune.tuned_specs(spec)
    assert [s.methods[0].label for s in specs] == ["zeroshot", "promptfl"]
    tuned = specs[1]
    assert tuned.lr == best["lr"] and tuned.local_epochs == best["local_epochs"]
    assert tuned.eps == (0.5,) and tuned.eval_split == "test" and tuned.rounds == spec.rounds
    assert all(s.tuned for s in specs)
    with pytest.raises(UsageError, match="no study tune-promptfl-synthetic-base2novel-server-eps1"):
        tune.tuned_specs(spec.model_copy(update={"eps": (1.0,)}))


# -- the real thing, tiny ----------------------------------------------------------------------
def tune_args(out: Path, cache: Path, trials: int, *extra: str) -> list[str]:
    return [
        "tune", "--methods", "promptfl", "--eps", "0.5", "--trials", str(trials),
        "--rounds", "4", "--trial-rounds", "2", "--eval-every", "1",
        "--out", str(out), "--cache-dir", str(cache), *TINY, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_tiny_study_end_to_end(tmp_path, cache, capsys, monkeypatch):
    code, out, err = run_cli(tune_args(tmp_path, cache, 2), capsys, monkeypatch)
    assert code == 0, err
    assert "image features [val]" in err and "image features [test]" not in err
    study = optuna.load_study(
        study_name="tune-promptfl-synthetic-base2novel-server-eps0.5",
        storage=f"sqlite:///{tmp_path}/optuna.db",
    )
    assert tune.tally(study).ended == 2
    assert "fpl-bench run --tuned --methods promptfl --eps 0.5" in out
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert complete and 0 < complete[0].user_attrs["eps_spent"] <= 0.5


def worker(out: Path, cache: Path, trials: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}
    return subprocess.Popen(
        [sys.executable, "-m", "fpl_bench.cli", *tune_args(out, cache, trials, *extra)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def assert_each_trial_once(study: optuna.Study, trials: int) -> None:
    """`trials` trials ended, numbered 0.. without gaps, none left RUNNING or WAITING."""
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers)))
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert tune.tally(study).ended == trials


@pytest.mark.slow
def test_two_local_workers_share_a_journal_study(tmp_path, cache):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    out = finish(worker(tmp_path, cache, 3, "--workers", "2"))
    assert "[w0]" in out and "[w1]" in out
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    study = optuna.load_study(
        study_name="tune-promptfl-synthetic-base2novel-server-eps0.5", storage=storage
    )
    assert_each_trial_once(study, 3)
    assert len(study.trials) == 3
    assert study.user_attrs["fpl.workers_joined"] == 2


# -- PostgreSQL: workers on many machines --------------------------------------------------------
def pg_storage() -> optuna.storages.BaseStorage:
    return tune.open_storage(tune.parse_storage(POSTGRES_URL, out=Path(".")))


def pg_study(prefix: str, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    name = f"{prefix}-promptfl-synthetic-base2novel-server-eps0.5"
    return optuna.load_study(study_name=name, storage=storage or pg_storage())


@needs_postgres
def test_two_workers_share_one_study_on_postgres(tmp_path, cache):
    prefix = f"t{uuid.uuid4().hex[:8]}"
    extra = ("--storage", POSTGRES_URL, "--study", prefix)
    procs = [worker(tmp_path / f"machine{i}", cache, 4, *extra) for i in range(2)]
    outputs = [finish(p) for p in procs]
    study = pg_study(prefix)
    assert_each_trial_once(study, 4)
    assert len(study.trials) == 4
    assert study.user_attrs["fpl.workers_joined"] == 2
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 4  # seeded apart
    ran = [o.count(": trial ") for o in outputs]
    assert sum(ran) == 4, outputs


@needs_postgres
def test_killed_worker_trial_is_failed_by_heartbeat_and_retried(tmp_path, cache):
    prefix = f"k{uuid.uuid4().hex[:8]}"
    extra = ("--storage", POSTGRES_URL, "--study", prefix, "--heartbeat", "1")
    storage = pg_storage()  # its tables exist before the worker starts: looks only read
    first = worker(tmp_path, cache, 2, *extra)
    # Catch the worker mid-trial without a race: freeze it (SIGSTOP) before each look at the
    # study, so a trial seen RUNNING cannot finish before the kill; thaw it between looks. It
    # runs only ~50 ms between looks and a trial needs about a second, so one is always seen.
    deadline = time.monotonic() + 600
    running, watched = [], None
    while not running:
        assert first.poll() is None and time.monotonic() < deadline, "no trial started"
        time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)
        try:
            watched = watched or pg_study(prefix, storage)
            running = [  # mid-trial: promptfl's two values are drawn, training has begun
                t
                for t in watched.get_trials(states=(TrialState.RUNNING,))
                if {"lr", "local_epochs"} <= t.params.keys()
            ]
        except KeyError:  # the study is not created yet
            pass
        if not running:
            first.send_signal(signal.SIGCONT)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed = running[0].number
    assert pg_study(prefix).trials[killed].state == TrialState.RUNNING

    out = finish(worker(tmp_path, cache, 2, *extra))
    study = pg_study(prefix)
    assert study.trials[killed].state == TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retries[0].params == study.trials[killed].params
    assert_each_trial_once(study, 2)
    assert f"trial {killed} FAIL" in out and "worker stopped" in out
