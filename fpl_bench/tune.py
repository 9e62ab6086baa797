"""Hyperparameter tuning: one Optuna study per (method, dataset, protocol, trust, eps).

Tuning sees the validation split only (`eval_split="val"`, carved from the training data,
never test). The objective is the protocol's reported metric (`OBJECTIVE_METRIC`: local_acc
for personalized, hm for base2novel), the mean over the last k evaluations, and over seeds when
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
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from fpl_bench.catalog import (
    RUN_SEARCH_KEYS,
    MethodChoice,
    SearchRange,
    learner_cards,
    preset_cards,
    remember_cards,
    resolve_method,
    scheme_cards,
)
from fpl_bench.errors import UsageError
from fpl_bench.heartbeat import HeartbeatStorage
from fpl_bench.parallel import TUNE_WORKER_MODULES, adopt_parent, warm_workers, worker_context
from fpl_bench.process import configure_process
from fpl_bench.report.records import normalize_eps
from fpl_bench.spec import ExperimentSpec, build_spec

Log = Callable[[str], None]

OBJECTIVE_METRIC = {"personalized": "local_acc", "base2novel": "hm"}
DEFAULT_PREFIX = "tune"
EXPERIMENT = "fpl-bench-tune"  # MLflow experiment of studies and trials (not the leaderboard's)
HEARTBEAT_INTERVAL = 20  # seconds between a running trial's heartbeats
GRACE_FACTOR = 3  # a trial is stale after GRACE_FACTOR missed heartbeats
MAX_RETRY = 2  # a stale trial is retried at most this many times
RUN_KINDS: dict[str, type] = {
    "lr": float,
    "clip_norm": float,
    "local_epochs": int,
    "n_ctx": int,
    "batch_size": int,
}
# Trials end COMPLETE, PRUNED or FAIL; RUNNING and WAITING are still to come.
ENDED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
MLFLOW_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


# -- storage -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StorageTarget:
    """Where studies live: kind 'sqlite' | 'postgresql' (URLs) | 'journal' (a file path)."""

    kind: Literal["sqlite", "postgresql", "journal"]
    location: str

    @property
    def shown(self) -> str:
        """The location with any password replaced by ***."""
        head, at, tail = self.location.rpartition("@")
        if not at or "://" not in head:
            return self.location
        scheme, _, userinfo = head.partition("://")
        user = userinfo.split(":", 1)[0]
        return f"{scheme}://{user}:***@{tail}" if ":" in userinfo else self.location

    @property
    def rdb_url(self) -> str:
        """The SQLAlchemy URL: PostgreSQL through psycopg2 (SQLAlchemy 2.1's default driver is
        psycopg 3, which is not a dependency)."""
        if self.kind == "postgresql":
            return "postgresql+psycopg2://" + self.location.split("://", 1)[1]
        return self.location

    @property
    def file(self) -> Path | None:
        """The file of a sqlite or journal storage (None for a server)."""
        if self.kind == "journal":
            return Path(self.location)
        if self.kind == "sqlite":
            return Path(self.location.removeprefix("sqlite:///"))
        return None


STORAGE_HELP = (
    "use sqlite:///FILE.db (one worker), FILE.journal (worker processes on one machine) "
    "or postgresql://USER:PASSWORD@HOST:PORT/DB (workers on many machines)"
)


def parse_storage(text: str | None, *, out: Path, workers: int = 1) -> StorageTarget:
    """The `--storage` value (default: OUT/optuna.db, or OUT/optuna.journal for workers > 1)."""
    if text is None:
        out = Path(out).resolve()
        if workers > 1:
            return StorageTarget("journal", str(out / "optuna.journal"))
        return StorageTarget("sqlite", f"sqlite:///{out / 'optuna.db'}")
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("postgresql", "postgres", "postgresql+psycopg2"):
        return StorageTarget("postgresql", "postgresql://" + text.split("://", 1)[1])
    if scheme == "sqlite":
        if workers > 1:
            raise UsageError(
                f"--storage {text}: SQLite is for one worker (--workers {workers}); "
                "use OUT/optuna.journal or postgresql://"
            )
        return StorageTarget("sqlite", text)
    if not scheme and text.endswith(".journal"):
        return StorageTarget("journal", str(Path(text).resolve()))
    shown = StorageTarget("postgresql", text).shown
    raise UsageError(f"--storage {shown}: unknown storage {scheme or text!r}; {STORAGE_HELP}")


def check_storage(target: StorageTarget, *, create: bool = True) -> None:
    """Refuse, fast and in one line, a storage that cannot be used: an unreachable database
    (5 s connect timeout) or a file whose folder does not exist."""
    if target.kind == "postgresql":
        import psycopg2

        try:
            psycopg2.connect(target.location, connect_timeout=5).close()
        except psycopg2.Error as err:
            reason = " ".join(str(err).split()) or type(err).__name__
            raise UsageError(
                f"--storage {target.shown}: cannot connect ({reason}); start the server or fix "
                "the URL (.ci/postgres.sh starts one on this machine)"
            ) from None
        return
    path = target.file
    assert path is not None
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    if not path.parent.is_dir():
        raise UsageError(f"--storage {target.shown}: folder {path.parent} does not exist")


def open_storage(
    target: StorageTarget,
    *,
    heartbeat_interval: int | None = None,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> optuna.storages.BaseStorage:
    """The Optuna storage; RDB storages get a heartbeat when `heartbeat_interval` is given."""
    if target.kind == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(target.location))
    connect = {"timeout": 60} if target.kind == "sqlite" else {"connect_timeout": 10}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return HeartbeatStorage(
            target.rdb_url,
            engine_kwargs={"pool_pre_ping": True, "connect_args": connect},
            heartbeat_interval=heartbeat_interval,
            grace_period=None if heartbeat_interval is None else GRACE_FACTOR * heartbeat_interval,
            heartbeat_stale_trial_callback=on_stale if heartbeat_interval else None,
        )


def lock_path(storage_file: Path) -> str:
    """The file StudyLock flocks beside a sqlite or journal storage file."""
    return f"{storage_file}.fpl-lock"


class StudyLock:
    """A lock every worker of a storage shares: held while a worker counts a study and Optuna
    creates its next trial (and while storage tables, studies and MLflow runs are created).

    A file lock (flock) beside a sqlite or journal file; a PostgreSQL advisory lock on the
    database. Both are released by the system when the holder dies. `release` is idempotent.
    """

    def __init__(self, target: StorageTarget) -> None:
        self.target, self.held = target, False
        self._fd: int | None = None
        self._conn: Any = None
        if target.kind == "postgresql":
            import psycopg2

            self._conn = psycopg2.connect(target.location, connect_timeout=10)
            self._conn.autocommit = True
            with self._conn.cursor() as cur:  # let the server notice a dead holder in ~1 min
                cur.execute("SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10")
            digest = hashlib.sha256(b"fpl-bench tune").digest()
            self._key = int.from_bytes(digest[:8], "big", signed=True)
        else:
            path = target.file
            assert path is not None
            # not PATH.lock: Optuna's journal backend takes that name for its own lock file,
            # waits 30 s while it exists, then deletes it (and with it this flock's file)
            self._fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o644)

    def acquire(self) -> None:
        if self.held:
            return
        if self._conn is not None:
            with self._conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_lock(%s)", (self._key,))
        else:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        if self._conn is not None:
            with self._conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", (self._key,))
        else:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self.held = False

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def close(self) -> None:
        self.release()
        if self._conn is not None:
            self._conn.close()
        if self._fd is not None:
            os.close(self._fd)


# -- studies and search spaces -----------------------------------------------------------------
def study_name(
    prefix: str, *, method: str, dataset: str, protocol: str, trust: str, eps: float | None
) -> str:
    """'tune-promptfl-synthetic-base2novel-server-eps0.5': one study per such cell."""
    return f"{prefix}-{method}-{dataset}-{protocol}-{trust}-eps{normalize_eps(eps)}"


@dataclass(frozen=True)
class SearchParam:
    """One entry of a card's [search] table: what it sets ('run', 'learner', 'scheme'), the
    value's type and its range."""

    key: str  # as on the card: "lr", "scheme.rank"
    target: str
    kind: type
    space: SearchRange


def search_space(method: str) -> list[SearchParam]:
    """The preset card's [search] table, checked; UsageError (one line) when there is none or
    an entry cannot be sampled."""
    presets = preset_cards()
    if method not in presets:
        raise UsageError(
            f"{method} cannot be tuned: only presets have a [search] table "
            f"(fpl-bench methods lists them)"
        )
    card = presets[method]
    if not card.search:
        raise UsageError(f"{method} cannot be tuned: methods/{method}.toml has no [search] table")
    params = []
    for key, space in card.search.items():
        if key in RUN_SEARCH_KEYS:
            target, kind = "run", RUN_KINDS[key]
        else:
            target, _, option = key.partition(".")
            cards = learner_cards() if target == "learner" else scheme_cards()
            component = card.learner if target == "learner" else card.scheme
            kind = cards[component].options[option].kind
        param = SearchParam(key, target, kind, space)
        _check_range(method, param)
        params.append(param)
    return params


def _check_range(method: str, param: SearchParam) -> None:
    where = f"methods/{method}.toml [search] {param.key}"
    space = param.space
    if space.choices is not None:
        return
    if space.low is None or space.high is None or space.low > space.high:
        raise UsageError(f"{where}: low {space.low} > high {space.high}; swap them")
    if param.kind not in (int, float):
        raise UsageError(f"{where}: a {param.kind.__name__} option needs choices = [...]")
    if space.log and space.step is not None:
        raise UsageError(f"{where}: give log = true or step, not both")
    if param.kind is int and not all(float(v).is_integer() for v in (space.low, space.high)):
        raise UsageError(f"{where}: integer option with bounds {space.low}, {space.high}")


def endpoint_values(param: SearchParam) -> list[Any]:
    """The values a search entry can reach at its edges (or all its choices)."""
    space = param.space
    if space.choices is not None:
        return list(space.choices)
    return [param.kind(space.low), param.kind(space.high)]


def check_search_space(method: str, base: ExperimentSpec) -> list[SearchParam]:
    """`search_space`, with every edge value checked by the same validators as a run (option
    bounds, spec fields), so a bad range fails before any training."""
    params = search_space(method)
    for param in params:
        for value in endpoint_values(param):
            try:
                if param.target == "run":
                    _spec_with(base, {param.key: value}, resolve_method(method))
                else:
                    resolve_method(method, {param.key: value})
            except UsageError as err:
                raise UsageError(f"methods/{method}.toml [search] {param.key}: {err}") from None
    return params


def suggest(trial: optuna.Trial, params: list[SearchParam]) -> dict[str, Any]:
    """One value per search entry, keyed as on the card."""
    values = {}
    for param in params:
        space = param.space
        if space.choices is not None:
            values[param.key] = trial.suggest_categorical(param.key, space.choices)
        elif param.kind is int:
            step = int(space.step or 1)
            values[param.key] = trial.suggest_int(
                param.key, int(space.low), int(space.high), step=step, log=space.log
            )
        else:
            values[param.key] = trial.suggest_float(
                param.key, space.low, space.high, step=space.step, log=space.log
            )
    return values


def split_values(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """{card key: value} -> (run settings for the spec, learner./scheme. method overrides)."""
    run = {k: v for k, v in values.items() if k in RUN_SEARCH_KEYS}
    return run, {k: v for k, v in values.items() if k not in RUN_SEARCH_KEYS}


def _spec_with(base: ExperimentSpec, run: dict[str, Any], choice: MethodChoice, **extra: Any):
    fields = {name: getattr(base, name) for name in type(base).model_fields}
    return build_spec(**{**fields, **run, "methods": (choice,), **extra})


# -- the tuning job ----------------------------------------------------------------------------
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
    from fpl_bench.experiment import run_config

    config = run_config(job.spec, choice)
    for key in [*card_search(choice.label), "data_root"]:
        config.pop(key, None)
    config["objective"] = job.metric
    config["trial_rounds"] = job.rounds_trained
    config["search"] = {
        k: v.model_dump(exclude_none=True) for k, v in card_search(choice.label).items()
    }
    return json.loads(json.dumps(config, default=str))


def card_search(method: str) -> dict[str, SearchRange]:
    return dict(preset_cards()[method].search)


def sampler_seed(study_seed: int, worker_index: int) -> int:
    """A 32-bit seed from (study seed, worker index); workers of a study never share one."""
    return int(np.random.SeedSequence([study_seed, worker_index]).generate_state(1)[0])


def make_pruner(trials: int) -> optuna.pruners.BasePruner:
    """MedianPruner: a trial stops when its metric at an evaluation round is below the median
    of earlier trials at that round; it needs a few complete trials first."""
    return optuna.pruners.MedianPruner(n_startup_trials=max(1, min(5, trials // 4)))


def make_sampler(trials: int, seed: int) -> optuna.samplers.BaseSampler:
    """TPE; random for its first third of a small budget (at most 10); a constant liar so that
    parallel workers spread out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=max(2, min(10, trials // 3)), constant_liar=True
        )


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


# -- one trial ---------------------------------------------------------------------------------
def train_seed(
    prep: Any,
    fed: Any,
    choice: MethodChoice,
    eps: float | None,
    seed: int,
    on_eval: Callable[[int, dict[str, float]], None] | None,
    *,
    trial_rounds: int | None = None,
    plans: dict[tuple, Any] | None = None,
) -> tuple[list[dict[str, float]], Any]:
    """The first `trial_rounds` rounds (all when None) of the federated run `prep.spec`
    describes, set up as `fpl_bench.experiment.run_one` does, without tracking. Under DP the
    noise is calibrated for all `spec.rounds` rounds, so a trial trains at the noise level of
    the run it tunes for. Returns (evaluation history, privacy ledger of the full run or None).

    `plans` memoizes the calibration, a pure function of the clients' (sample rate, steps) and
    the privacy settings that takes seconds: trials that differ only in lr share it.
    """
    import torch

    from fpl_bench.driver import NoisePlan
    from fpl_bench.experiment import federated_run, plan_run_privacy, schedule_of, set_threads
    from fpl_bench.method import build_method

    spec = prep.spec
    method = build_method(choice)
    full = schedule_of(spec)
    schedule = replace(full, rounds=min(trial_rounds or spec.rounds, spec.rounds))
    torch.manual_seed(seed)
    private = eps is not None and method.trains
    set_threads(spec, private=private, device=prep.device)

    run = federated_run(prep, fed, method, seed, schedule)
    ledger = None
    if private:
        planned = run if schedule == full else federated_run(prep, fed, method, seed, full)
        key = (tuple(sorted(set(planned.budget()))), eps, spec.delta, spec.clip_norm)
        key += (spec.rounds, spec.accountant)
        plans = {} if plans is None else plans
        if key not in plans:
            plans[key] = plan_run_privacy(planned, spec, eps)
        ledger = plans[key]
        run.enable_privacy(
            NoisePlan(noise_multiplier=ledger.noise_multiplier, clip_norm=spec.clip_norm)
        )
    return run.run(on_eval=on_eval).history, ledger


@dataclass
class Workbench:
    """What a worker keeps across trials: prepared data and features, federations by seed,
    text towers by n_ctx, noise calibrations."""

    prep: Any
    feds: dict[int, Any] = field(default_factory=dict)
    towers: dict[int, Any] = field(default_factory=dict)
    plans: dict[tuple, Any] = field(default_factory=dict)

    def federation(self, seed: int) -> Any:
        from fpl_bench.experiment import federation

        if seed not in self.feds:
            self.feds[seed] = federation(self.prep, seed)
        return self.feds[seed]

    def for_spec(self, spec: ExperimentSpec) -> Any:
        """The prepared data with this trial's spec (and a tower for its n_ctx)."""
        from fpl_bench.prompt import TextTower

        prep = self.prep
        if spec.n_ctx == prep.spec.n_ctx:
            return replace(prep, spec=spec)
        if spec.n_ctx not in self.towers:
            model, tokenizer = prep.backbone.model, prep.backbone.tokenizer
            self.towers[spec.n_ctx] = TextTower.build(
                model, tokenizer, prep.splits.classnames, n_ctx=spec.n_ctx
            )
        return replace(prep, spec=spec, tower=self.towers[spec.n_ctx])


class Objective:
    """The study's objective: one trial = one federated run per seed on the validation split."""

    def __init__(
        self,
        job: TuneJob,
        bench: Workbench,
        choice: MethodChoice,
        eps: float | None,
        params: list[SearchParam],
        lock: StudyLock,
    ) -> None:
        self.job, self.bench, self.choice, self.eps = job, bench, choice, eps
        self.params, self.lock = params, lock

    def __call__(self, trial: optuna.Trial) -> float:
        from fpl_bench.driver import Diverged
        from fpl_bench.evaluate import final_metrics

        self.lock.release()  # the trial exists now: other workers may count it
        t0 = time.perf_counter()
        run, overrides = split_values(suggest(trial, self.params))
        choice = resolve_method(self.choice.label, {**self.choice.options(), **overrides})
        spec = _spec_with(self.job.spec, run, choice, eps=(self.eps,))
        prep = self.bench.for_spec(spec)
        metric, finals, spent = self.job.metric, [], []
        for i, seed in enumerate(spec.seeds):
            on_eval = self._reporter(trial, t0) if i == 0 else None
            try:
                history, ledger = train_seed(
                    prep,
                    self.bench.federation(seed),
                    choice,
                    self.eps,
                    seed,
                    on_eval,
                    trial_rounds=self.job.trial_rounds,
                    plans=self.bench.plans,
                )
            except Diverged:
                trial.set_user_attr("status", "diverged")
                trial.set_user_attr("wall_s", time.perf_counter() - t0)
                raise
            final = final_metrics(
                [{k: v for k, v in h.items() if k not in ("round", "train_loss")} for h in history],
                spec.last_k,
            )
            finals.append(final)
            if ledger is not None:
                spent.append(ledger.eps_spent)
        for name in finals[0]:
            trial.set_user_attr(f"val/{name}", float(np.nanmean([f[name] for f in finals])))
        if spent:
            trial.set_user_attr("eps_spent", max(spent))
        trial.set_user_attr("status", "finished")
        trial.set_user_attr("wall_s", time.perf_counter() - t0)
        return float(np.mean([f[metric] for f in finals]))

    def _reporter(self, trial: optuna.Trial, t0: float) -> Callable[[int, dict], None]:
        """Report each evaluation's metric (step = round); prune before the last round."""
        rounds = self.job.rounds_trained

        def on_eval(round_no: int, metrics: dict[str, float]) -> None:
            value = float(metrics[self.job.metric])
            if math.isfinite(value):
                trial.report(value, round_no)
            if round_no < rounds and trial.should_prune():
                trial.set_user_attr("status", "pruned")
                trial.set_user_attr("pruned_at", round_no)
                trial.set_user_attr("wall_s", time.perf_counter() - t0)
                raise optuna.TrialPruned(f"round {round_no}: {value:.4f} below the median")

        return on_eval


# -- MLflow ------------------------------------------------------------------------------------
def _ms(moment: Any) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def format_params(params: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


class TrialLogger:
    """Optuna callback: each ended trial becomes one MLflow run under its study's run (tags
    mlflow.parentRunId, optuna.trial), and one printed line. Also called for trials that the
    heartbeat failed (their worker died)."""

    def __init__(self, tracker: Any, metric: str, log: Log) -> None:
        self.tracker, self.metric, self.log = tracker, metric, log
        self.parents: dict[str, str] = {}

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client, state = self.tracker.client, trial.state.name
        run = client.create_run(
            self.tracker.experiment_id,
            run_name=f"{study.study_name}-trial{trial.number}",
            start_time=_ms(trial.datetime_start),
            tags={
                "mlflow.parentRunId": self.parents[study.study_name],
                "optuna.study": study.study_name,
                "optuna.trial": str(trial.number),
                "optuna.state": state,
                "fpl.role": "trial",
                "status": str(trial.user_attrs.get("status", state.lower())),
            },
        )
        run_id, now = run.info.run_id, int(time.time() * 1000)
        params = [Param(k, str(v)) for k, v in trial.params.items()]
        retried = trial.system_attrs.get("failed_trial")
        tags = [RunTag("optuna.retry_of", str(retried))] if retried is not None else []
        metrics = [
            Metric(f"round/{self.metric}", float(v), now, int(step))
            for step, v in trial.intermediate_values.items()
        ]
        numbers = {k: v for k, v in trial.user_attrs.items() if isinstance(v, int | float)}
        if trial.state == TrialState.COMPLETE:
            numbers[f"objective/{self.metric}"] = trial.value
        metrics += [Metric(k, float(v), now, 0) for k, v in numbers.items()]
        client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        client.set_terminated(
            run_id, status=MLFLOW_STATUS[state], end_time=_ms(trial.datetime_complete)
        )
        self.log(trial_line(study.study_name, trial, self.metric))

    def open_parent(self, name: str, params: dict[str, Any]) -> str:
        """The study's MLflow run (found by tag, else created; the caller holds the lock)."""
        client = self.tracker.client
        found = client.search_runs(
            [self.tracker.experiment_id],
            filter_string=f"tags.`fpl.study` = '{name}' AND tags.`fpl.role` = 'study'",
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.tracker.start(name, params, {"fpl.study": name, "fpl.role": "study"})
        self.parents[name] = run_id
        return run_id

    def close_parent(self, study: optuna.Study, count: Tally, budget: int) -> None:
        """Record the study's best trial on its run; FINISHED once every trial has ended."""
        from mlflow.entities import Metric, RunTag

        run_id, now = self.parents[study.study_name], int(time.time() * 1000)
        metrics = [Metric(f"trials/{k.lower()}", v, now, 0) for k, v in count.states.items()]
        tags = []
        best = best_trial(study)
        if best is not None:
            metrics.append(Metric(f"best/{self.metric}", float(best.value), now, 0))
            tags = [RunTag(f"best.{k}", str(v)) for k, v in best.params.items()]
            tags.append(RunTag("best.trial", str(best.number)))
        self.tracker.client.log_batch(run_id, metrics=metrics, tags=tags)
        if count.ended >= budget and count.running == 0 and count.waiting == 0:
            self.tracker.client.set_terminated(run_id, status="FINISHED")


def trial_line(name: str, trial: FrozenTrial, metric: str) -> str:
    """'tune-...: trial 3 COMPLETE lr=0.01 local_epochs=2 -> hm=0.6123 (41 s)'."""
    wall = trial.user_attrs.get("wall_s")
    took = f" ({wall:.0f} s)" if isinstance(wall, float) else ""
    head = f"{name}: trial {trial.number} {trial.state.name} {format_params(trial.params)}"
    if trial.state == TrialState.COMPLETE:
        return f"{head} -> {metric}={trial.value:.4f}{took}"
    if trial.state == TrialState.PRUNED:
        return f"{head} pruned at round {trial.user_attrs.get('pruned_at', '?')}{took}"
    why = trial.user_attrs.get("status", "worker stopped (no heartbeat)")
    return f"{head} failed: {why}{took}"


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: t.value) if complete else None


# -- workers -----------------------------------------------------------------------------------
@dataclass
class StudyRun:
    """A worker's handle on one study while it works on it."""

    study: optuna.Study
    choice: MethodChoice
    eps: float | None
    params: list[SearchParam]


def run_worker(job: TuneJob, slot: int = 0, log: Log = print) -> list[str]:
    """One worker: open every study of the job, then take trials until each study's budget is
    spent and none of its trials is still running (a trial of a dead worker is failed by the
    heartbeat and its retry taken). Returns the studies' summary lines."""
    from fpl_bench.experiment import prepare
    from fpl_bench.tracking import Tracker

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    remember_cards(job.spec.methods)  # a worker process: the job's method card files
    lock = StudyLock(job.storage)
    try:
        with lock:
            logger = TrialLogger(Tracker(job.spec.out, experiment=EXPERIMENT), job.metric, log)
            storage = open_storage(
                job.storage,
                heartbeat_interval=job.heartbeat_interval,
                on_stale=_stale_callback(logger),
            )
            studies = [_open(job, storage, logger, choice, eps) for choice, eps in job.cells()]
        bench = Workbench(prepare(job.spec, log=log))
        _work(job, studies, bench, lock, logger)
        with lock:
            lines = [_summary(job, s, logger) for s in studies]
    finally:
        lock.close()
    return lines


def _open(
    job: TuneJob, storage: Any, logger: TrialLogger, choice: MethodChoice, eps: float | None
) -> StudyRun:
    study = open_study(job, storage, choice, eps)
    params = search_space(choice.label)
    config = {**study.user_attrs["fpl.config"], "trials": job.trials, "storage": job.storage.shown}
    config.pop("search", None)
    logger.open_parent(study.study_name, config)
    return StudyRun(study, choice, eps, params)


def _stale_callback(logger: TrialLogger) -> Callable[[optuna.Study, FrozenTrial], None]:
    """Log a heartbeat-failed trial, then queue its retry (at most MAX_RETRY times)."""
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)

    def on_stale(study: optuna.Study, trial: FrozenTrial) -> None:
        if study.study_name in logger.parents:
            logger(study, trial)
        retry(study, trial)

    return on_stale


def _work(
    job: TuneJob, studies: list[StudyRun], bench: Workbench, lock: StudyLock, logger: TrialLogger
) -> None:
    """Round-robin over the studies until each is done; sleep a heartbeat interval while only
    other workers' trials are left running."""
    deadline = None if job.timeout is None else time.monotonic() + job.timeout
    pending = list(studies)
    while pending:
        for run in list(pending):
            if work_on_study(job, run, bench, lock, logger, deadline) == "done":
                pending.remove(run)
        if deadline is not None and time.monotonic() >= deadline:
            logger.log(f"--timeout {job.timeout:g} s reached: no new trials started")
            return
        if pending:
            time.sleep(job.heartbeat_interval)


def work_on_study(
    job: TuneJob,
    run: StudyRun,
    bench: Workbench,
    lock: StudyLock,
    logger: TrialLogger,
    deadline: float | None,
) -> Literal["done", "waiting"]:
    """Take trials of one study while it has any to give: 'done' when its budget is spent and
    no trial runs (or the storage cannot tell a dead worker: no heartbeat), else 'waiting'."""
    from fpl_bench.driver import Diverged

    objective = Objective(job, bench, run.choice, run.eps, run.params, lock)
    heartbeat = job.storage.kind != "journal"  # RDB storages record heartbeats
    while deadline is None or time.monotonic() < deadline:
        lock.acquire()
        try:
            optuna.storages.fail_stale_trials(run.study)
            count = tally(run.study)
            if not count.claimable(job.trials):
                return "waiting" if heartbeat and count.running else "done"
            run.study.optimize(objective, n_trials=1, catch=(Diverged,), callbacks=[logger])
        finally:
            lock.release()
    return "waiting"


def _summary(job: TuneJob, run: StudyRun, logger: TrialLogger) -> str:
    logger.close_parent(run.study, tally(run.study), job.trials)
    return summary_line(run.study, job.metric)


def summary_line(study: optuna.Study, metric: str) -> str:
    """'NAME: 5 complete, 3 pruned; best hm=0.81 with lr=0.01 local_epochs=1 (trial 4)'."""
    count, best = tally(study), best_trial(study)
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(count.states.items()))
    found = "no complete trial"
    if best is not None:
        found = f"best {metric}={best.value:.4f} with {format_params(best.params)}"
        found += f" (trial {best.number})"
    return f"{study.study_name}: {states or 'no trials'}; {found}"


def _worker_main(job: TuneJob, slot: int, env: dict[str, str], cwd: str) -> None:
    """Entry of a worker process: its lines prefixed with [wN]; a UsageError is one line.
    The process's settings are the worker's own (`process.configure_process`)."""
    adopt_parent(env, cwd)
    configure_process()

    def log(text: str) -> None:
        print(f"[w{slot}] {text}", flush=True)

    try:
        for line in run_worker(job, slot, log):
            log(line)
    except UsageError as err:
        print(f"fpl-bench: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def tune(job: TuneJob, log: Log = print) -> tuple[list[str], list[int]]:
    """Run the job: in this process for one worker, else in `job.workers` processes (forked
    from a fork server that imports torch, MLflow and Optuna while this process prepares,
    fpl_bench/parallel.py; started after this process has filled the feature cache and
    created the storage and MLflow tables, so that workers do not race to make them).
    Returns (summary lines, exit codes of workers that failed)."""
    check_storage(job.storage)
    if job.workers == 1:
        return run_worker(job, 0, log), []
    warm_workers(TUNE_WORKER_MODULES)
    from fpl_bench.experiment import prepare
    from fpl_bench.tracking import Tracker

    prepare(job.spec, log=log)
    with StudyLock(job.storage):
        Tracker(job.spec.out, experiment=EXPERIMENT)
        storage = open_storage(job.storage)
        for choice, eps in job.cells():
            optuna.create_study(
                storage=storage,
                study_name=job.name(choice, eps),
                direction="maximize",
                load_if_exists=True,
            )
    context = worker_context()
    parent = (dict(os.environ), os.getcwd())
    procs = [
        context.Process(target=_worker_main, args=(job, s, *parent)) for s in range(job.workers)
    ]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join()
    except KeyboardInterrupt:
        for proc in procs:
            proc.terminate()
        raise
    failed = [p.exitcode for p in procs if p.exitcode]
    return study_summaries(job), failed


def study_summaries(job: TuneJob) -> list[str]:
    """One line per study of the job, read from the storage."""
    storage = open_storage(job.storage)
    return [
        summary_line(optuna.load_study(study_name=job.name(c, e), storage=storage), job.metric)
        for c, e in job.cells()
    ]


# -- using the studies: fpl-bench run --tuned ------------------------------------------------
def reading_targets(storage: str | None, out: Path) -> list[StorageTarget]:
    """Storages to look for studies in: --storage, else OUT/optuna.db and OUT/optuna.journal
    (those that exist)."""
    if storage is not None:
        target = parse_storage(storage, out=out)
        check_storage(target, create=False)
        return [target]
    candidates = [parse_storage(None, out=out), parse_storage(None, out=out, workers=2)]
    return [t for t in candidates if t.file is not None and t.file.is_file()]


def best_params(storage: str | StorageTarget, study_name: str, *, out: Path = Path(".")) -> dict:
    """The best COMPLETE trial's parameters of a study, keyed as on the card ('lr',
    'scheme.rank'); UsageError when the study or a complete trial is missing."""
    target = storage if isinstance(storage, StorageTarget) else parse_storage(storage, out=out)
    names = optuna.get_all_study_names(open_storage(target))
    if study_name not in names:
        raise UsageError(
            f"no study {study_name} in {target.shown}; run `fpl-bench tune` for it first"
        )
    best = best_trial(optuna.load_study(study_name=study_name, storage=open_storage(target)))
    if best is None:
        raise UsageError(f"study {study_name} in {target.shown} has no complete trial yet")
    return dict(best.params)


def tuned_specs(
    spec: ExperimentSpec, *, storage: str | None = None, prefix: str = DEFAULT_PREFIX
) -> list[ExperimentSpec]:
    """One spec per (method, eps) of `spec`, with that study's best parameters over the run's
    own settings, marked tuned=True. A method without a [search] table runs as it is (nothing
    to tune) and is marked tuned too."""
    from fpl_bench.experiment import setup_hash

    targets = reading_targets(storage, Path(spec.out))
    setup = setup_hash(spec)
    specs = []
    for choice in spec.methods:
        for eps in spec.eps:
            values = {}
            if choice.preset is not None and card_search(choice.label):
                name = study_name(
                    prefix,
                    method=choice.label,
                    dataset=spec.dataset,
                    protocol=spec.protocol,
                    trust=spec.trust,
                    eps=eps,
                )
                values = _best_anywhere(targets, name, storage, Path(spec.out))
            run, overrides = split_values(values)
            tuned = resolve_method(choice.label, {**choice.options(), **overrides})
            specs.append(_spec_with(spec, run, tuned, eps=(eps,), tuned=True, tuned_from=setup))
    return specs


def _best_anywhere(
    targets: list[StorageTarget], name: str, storage: str | None, out: Path
) -> dict[str, Any]:
    for target in targets:
        if name in optuna.get_all_study_names(open_storage(target)):
            return best_params(target, name)
    where = storage or f"{out}/optuna.db or {out}/optuna.journal"
    raise UsageError(
        f"no study {name} in {where}; tune it first (fpl-bench tune --out {out}) or give "
        "--storage and --study"
    )
