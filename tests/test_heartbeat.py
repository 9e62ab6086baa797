"""HeartbeatStorage: a trial whose worker died before its first heartbeat is failed after one
grace period on this process's clock and retried; a beating trial is left alone."""

import optuna
import pytest
from optuna.trial import TrialState

from fpl_bench.tune.heartbeat import HeartbeatStorage

pytestmark = pytest.mark.filterwarnings(
    "ignore::optuna.exceptions.ExperimentalWarning",
    "ignore:Heartbeat of storage is supposed to be used with Study.optimize:UserWarning",
)
INTERVAL, GRACE = 60, 180  # long: Optuna's own rule (last beat older than GRACE) never fires here


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def study_and_clock(tmp_path):
    clock, failed = Clock(), []
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)

    def on_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        failed.append(trial.number)
        retry(study, trial)

    storage = HeartbeatStorage(
        f"sqlite:///{tmp_path}/optuna.db",
        heartbeat_interval=INTERVAL,
        grace_period=GRACE,
        heartbeat_stale_trial_callback=on_stale,
    )
    storage.clock = clock
    study = optuna.create_study(storage=storage, study_name="s")
    return study, clock, failed


def fail_stale(study: optuna.Study) -> None:
    optuna.storages.fail_stale_trials(study)


def test_trial_without_heartbeat_fails_after_one_grace_period(study_and_clock):
    study, clock, failed = study_and_clock
    dead = study.ask()  # RUNNING, and its worker never beat: killed right after asking
    fail_stale(study)  # first seen now (t = 1000)
    clock.now += GRACE  # exactly one grace period: not yet
    fail_stale(study)
    assert study.trials[dead.number].state == TrialState.RUNNING and failed == []
    clock.now += 1
    fail_stale(study)
    assert study.trials[dead.number].state == TrialState.FAIL and failed == [dead.number]
    retry = study.trials[-1]  # queued by Optuna's retry callback, for another worker to take
    assert retry.state == TrialState.WAITING and retry.system_attrs["failed_trial"] == dead.number
    fail_stale(study)  # failed once only
    assert failed == [dead.number]


def test_trial_that_beats_is_not_failed_by_the_no_heartbeat_rule(study_and_clock):
    study, clock, failed = study_and_clock
    live = study.ask()
    fail_stale(study)  # seen without a beat
    study._storage.record_heartbeat(live._trial_id)  # its heartbeat thread's first beat
    clock.now += 10 * GRACE  # our clock only: the beat itself is fresh in the database
    fail_stale(study)
    assert study.trials[live.number].state == TrialState.RUNNING and failed == []


def test_unbeaten_clock_starts_when_this_process_first_sees_the_trial(study_and_clock):
    study, clock, failed = study_and_clock
    clock.now += 10 * GRACE  # a long wait before the trial exists counts for nothing
    dead = study.ask()
    fail_stale(study)
    assert study.trials[dead.number].state == TrialState.RUNNING and failed == []
