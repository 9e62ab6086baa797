"""The tuning job and its studies: one study per (method, eps) cell of the job (`TuneJob`,
`study_name`), the configuration a study is tied to (`study_config`), opening it for a worker
(`open_study`), its trials as the budget counts them (`Tally`) and its best trial."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from fpl_bench.catalog import MethodChoice
from fpl_bench.errors import UsageError
from fpl_bench.report.records import normalize_eps
from fpl_bench.spec import ExperimentSpec
from fpl_bench.tune.space import card_search, make_pruner, make_sampler, sampler_seed
from fpl_bench.tune.storage import HEARTBEAT_INTERVAL, StorageTarget

# The metric each protocol's studies maximise, on the validation split. The domain protocols
# tune on what the training clients can see (local for multi-domain, the source domains for
# cross-domain and cross-dataset): tuning on the held-out target would leak it into the method.
OBJECTIVE_METRIC = {
    "personalized": "local_acc",
    "base2novel": "hm",
    "multi-domain": "local_acc",
    "cross-domain": "source_acc",
    "cross-dataset": "source_acc",
    "global": "global_acc",
    "dual": "hm",
}
DEFAULT_PREFIX = "tune"
# Trials end COMPLETE, PRUNED or FAIL; RUNNING and WAITING are still to come.
ENDED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def study_name(
    prefix: str, *, method: str, dataset: str, protocol: str, trust: str, eps: float | None
) -> str:
    """'tune-promptfl-synthetic-base2novel-server-eps0.5': one study per such cell."""
    return f"{prefix}-{method}-{dataset}-{protocol}-{trust}-eps{normalize_eps(eps)}"


@dataclass(frozen=True)
class TuneJob:
    """Everything a worker needs (picklable: worker processes receive it).

    `spec.methods` x `spec.eps` are the studies; `spec.eval_split` is "val"."""

    spec: ExperimentSpec
    trials: int
    storage: StorageTarget
    trial_rounds: int | None = None  # rounds a trial trains (None: all of spec.rounds)
    prefix: str = DEFAULT_PREFIX
    sampler_seed: int = 0
    workers: int = 1
    timeout: float | None = None
    heartbeat_interval: int = HEARTBEAT_INTERVAL

    def cells(self) -> list[tuple[MethodChoice, float | None]]:
        return [(choice, eps) for choice in self.spec.methods for eps in self.spec.eps]

    def name(self, choice: MethodChoice, eps: float | None) -> str:
        s = self.spec
        return study_name(
            self.prefix,
            method=choice.label,
            dataset=s.dataset,
            protocol=s.protocol,
            trust=s.trust,
            eps=eps,
        )

    @property
    def metric(self) -> str:
        return OBJECTIVE_METRIC[self.spec.protocol]

    @property
    def rounds_trained(self) -> int:
        return min(self.trial_rounds or self.spec.rounds, self.spec.rounds)


def study_config(job: TuneJob, choice: MethodChoice) -> dict[str, Any]:
    """What the trials of a study share (JSON): two workers or two sessions may only add trials
    to a study whose configuration is theirs. Searched settings and paths are left out."""
    from fpl_bench.run_records import run_config

    config = run_config(job.spec, choice)
    for key in [*card_search(choice.label), "data_root"]:
        config.pop(key, None)
    config["objective"] = job.metric
    config["trial_rounds"] = job.rounds_trained
    config["search"] = {
        k: v.model_dump(exclude_none=True) for k, v in card_search(choice.label).items()
    }
    return json.loads(json.dumps(config, default=str))


def open_study(
    job: TuneJob, storage: optuna.storages.BaseStorage, choice: MethodChoice, eps: float | None
) -> optuna.Study:
    """Create the study or load it (the caller holds the lock); refuse one made for another
    configuration; claim this worker's index and seed the sampler from it."""
    name = job.name(choice, eps)
    study = optuna.create_study(
        storage=storage, study_name=name, direction="maximize", load_if_exists=True
    )
    config = study_config(job, choice)
    stored = study.user_attrs.get("fpl.config")
    if stored is None:
        study.set_user_attr("fpl.config", config)
        study.set_user_attr("fpl.eps", normalize_eps(eps))
    elif stored != config:
        key = next(k for k in sorted({*stored, *config}) if stored.get(k) != config.get(k))
        raise UsageError(
            f"study {name} in {job.storage.shown} was tuned with {key}={stored.get(key)!r}, "
            f"not {config.get(key)!r}; use another --study prefix or the same settings"
        )
    index = int(study.user_attrs.get("fpl.workers_joined", 0))
    study.set_user_attr("fpl.workers_joined", index + 1)
    return optuna.load_study(
        study_name=name,
        storage=storage,
        sampler=make_sampler(job.trials, sampler_seed(job.sampler_seed, index)),
        pruner=make_pruner(job.trials),
    )


@dataclass(frozen=True)
class Tally:
    """A study's trials as the budget sees them: a failed trial that was retried is replaced by
    its retry (listed in the retry's `retry_history`)."""

    ended: int
    running: int
    waiting: int
    states: dict[str, int]

    def claimable(self, budget: int) -> bool:
        """A queued retry is always run; a new trial only within the budget."""
        return self.waiting > 0 or self.ended + self.running < budget


def tally(study: optuna.Study) -> Tally:
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    counted = [t for t in trials if t.number not in retried]
    states: dict[str, int] = {}
    for t in counted:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return Tally(
        ended=sum(t.state in ENDED for t in counted),
        running=states.get("RUNNING", 0),
        waiting=states.get("WAITING", 0),
        states=states,
    )


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: t.value) if complete else None
