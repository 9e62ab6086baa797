"""Hyperparameter tuning: one Optuna study per (method, dataset, protocol, trust, eps).

Tuning sees the validation split only (`eval_split="val"`, carved from the training data,
never test). The objective is a metric the protocol reports (`OBJECTIVE_METRIC`: local_acc
for personalized, hm for base2novel and dual, ...; never a held-out target's), the mean over
the last k evaluations, and over seeds when
several are given. The search space is the preset card's `[search]` table
(`fpl_bench.catalog.PresetCard.search`); a card without one cannot be tuned. Tuning reads the
private training data: the epsilon a tuned run reports covers that final training run only,
not the trials that chose its hyperparameters.

One trial, in call order (`run_worker` -> `work_on_study` -> `Study.optimize(n_trials=1)`):

1. `work_on_study` takes the storage's lock (`StudyLock`), fails the trials whose worker
   stopped sending heartbeats (their retry is queued by `RetryHeartbeatStaleTrialCallback`),
   and counts the study (`Tally`; a failed trial that was retried counts once, through its
   retry). With the budget spent and nothing queued it stops.
2. Optuna asks for a trial (a queued retry first, else a new one) and starts its heartbeat.
3. `Objective.__call__` releases the lock (so no two workers can take the last slot), then
   `suggest` turns the card's ranges into run settings (`lr`, ...) and method options.
4. `train_seed`: per seed, the first `trial_rounds` rounds of the federated run being tuned
   for, on the validation split; under DP its noise is calibrated for all `spec.rounds`
   rounds, so a trial trains at the final run's noise level. Each evaluation of the first
   seed is `trial.report`ed; the MedianPruner may stop the trial (`optuna.TrialPruned`). A
   diverged run raises `Diverged`, which `optimize` records as a FAIL trial.
5. The value: mean over seeds of the last-k mean of the metric.
6. `TrialLogger`: one MLflow run for the trial, nested under the study's run (tag
   `mlflow.parentRunId`), tagged with the trial number; it also prints the trial's line.

Storage (`StorageTarget`): `sqlite:///OUT/optuna.db` for one worker; for `workers` processes
on one machine a `JournalFileBackend` file (`OUT/optuna.journal`; Optuna's FAQ advises against
SQLite in parallel); `postgresql://` for workers on many machines, each started with the same
command. RDB storages (SQLite, PostgreSQL) record heartbeats, so a killed worker's trial is
failed and retried, never left RUNNING (also one killed before its first heartbeat:
`heartbeat.HeartbeatStorage`); the journal file has no heartbeat. Each worker's
TPESampler is seeded from (study seed, worker index), the index claimed from the study under
the lock, so workers never propose the same values.

storage.py     where studies live (`StorageTarget`: sqlite, journal file, PostgreSQL), opening
               and checking a storage, and `StudyLock`, the lock a storage's workers share
heartbeat.py   `HeartbeatStorage`: an RDB storage that also fails a trial whose worker died
               before its first heartbeat
space.py       what is searched: the card's [search] table (`SearchParam`, `search_space`),
               `suggest`, `split_values`, the TPE sampler and the median pruner
study.py       the job (`TuneJob`) and its studies: names, the configuration a study is tied
               to, `open_study`, the trials as the budget counts them (`Tally`), the best trial
objective.py   one trial: `Objective`, `train_seed`, the `Workbench` a worker keeps
logger.py      `TrialLogger` (MLflow runs of studies and trials), the trial and summary lines
workers.py     the worker loop (`run_worker`, `work_on_study`), worker processes, `tune`
tuned.py       using the studies: best parameters for `fpl-bench run --tuned` (`tuned_specs`)
"""

from fpl_bench.tune.logger import EXPERIMENT
from fpl_bench.tune.space import (
    check_search_space,
    sampler_seed,
    search_space,
    split_values,
    suggest,
)
from fpl_bench.tune.storage import StudyLock, check_storage, lock_path, open_storage, parse_storage
from fpl_bench.tune.study import Tally, TuneJob, tally
from fpl_bench.tune.tuned import best_params, tuned_specs
from fpl_bench.tune.workers import run_worker, tune

__all__ = [
    "EXPERIMENT",
    "StudyLock",
    "Tally",
    "TuneJob",
    "best_params",
    "check_search_space",
    "check_storage",
    "lock_path",
    "open_storage",
    "parse_storage",
    "run_worker",
    "sampler_seed",
    "search_space",
    "split_values",
    "suggest",
    "tally",
    "tune",
    "tuned_specs",
]
