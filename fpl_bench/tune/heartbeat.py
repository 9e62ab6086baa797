"""An Optuna RDB storage that also fails a trial whose worker died before its first heartbeat.

Optuna's `RDBStorage` calls a RUNNING trial stale when its last heartbeat is older than the grace
period, and skips a trial that has no heartbeat at all. A worker killed between `study.ask()`
(which commits the trial as RUNNING) and its heartbeat thread's first beat leaves such a trial
RUNNING for ever, and every other worker of the study waits on it.

`HeartbeatStorage` also calls a trial stale once this process has seen it RUNNING without a
heartbeat for a whole grace period. It times that on its own monotonic clock: Optuna stamps
`datetime_start` with the asking worker's local clock, and workers on other machines may keep
another time. A live worker beats within milliseconds of asking, so a grace period (three
heartbeat intervals) without one means its worker is gone.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import optuna
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import TrialState


class HeartbeatStorage(optuna.storages.RDBStorage):
    """`RDBStorage` whose stale trials include those seen without a heartbeat for a grace
    period; `clock` (seconds, monotonic) is replaceable for tests."""

    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._unbeaten_since: dict[int, float] = {}  # trial id -> when first seen unbeaten

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        grace = self.grace_period or 2 * (self.heartbeat_interval or 0)
        now = self.clock()
        unbeaten = set(self._unbeaten_trial_ids(study_id))
        for trial_id in list(self._unbeaten_since):
            if trial_id not in unbeaten:  # it beat, or ended: the usual rule governs it
                del self._unbeaten_since[trial_id]
        for trial_id in sorted(unbeaten):
            since = self._unbeaten_since.setdefault(trial_id, now)
            if now - since > grace:
                stale.append(trial_id)
        return stale

    def _unbeaten_trial_ids(self, study_id: int) -> list[int]:
        """Ids of the study's RUNNING trials that have no heartbeat row."""
        trial = models.TrialModel
        with _create_scoped_session(self.scoped_session, True) as session:
            rows = (
                session.query(trial.trial_id)
                .filter(trial.study_id == study_id)
                .filter(trial.state == TrialState.RUNNING)
                .filter(~trial.heartbeats.any())
                .all()
            )
        return [row[0] for row in rows]
