"""The privacy audit of a job: train (or reuse) its runs, query the models they release, run
the attacks of `privacy/membership.py` and, for private runs, the one-run canary audit of
`privacy/canary_audit.py` at the run's settings; write OUT/audit.csv and one MLflow run per
(run, attack).

    job = AuditJob(spec, targets=(0,), attacks=("loss", "shadow", "canary"))
    frame = run_audit(job, log=print)     # one row per method x eps x target seed x attack

The canary attack (`canary_row`) does not query the trained prompts: it simulates the DP-SGD
steps of the run's ledger client (its q, noisy steps, target eps, delta, C, client count and
momentum) with `CANARIES` white-box gradient canaries and the attacker the run's trust model
allows, and writes the one-run lower bound on epsilon at 95% (`eps_lower`, with its `guesses`
and `correct`); runs without DP have none. The report puts it beside the cell
(fpl_bench/report/audits.py). The input attack (`input_canary_row`, opt-in) is its black-box
counterpart through the real driver: one more run whose clients hold mislabeled canaries
(`fpl_bench/input_canaries.py`), scored by the released models, for runs with and without DP.

Runs. `spec.seeds` are the audited seeds (`targets`) followed by `shadow_seeds(targets, n)`
(`audit --shadow-runs n`), the smallest seeds not audited. The shadow attack's shadow runs are
the runs of the same method, eps, trust and configuration under the job's other seeds (other
partitions, other initialisations), the audited ones included; a run never shadows itself. `run_experiment` trains whatever OUT does not already
hold finished (as `run --resume`), so a job's runs are reused and shadow runs are ordinary runs
in OUT/results.csv.

Queries (`run_queries`), per run and client c, against the model c releases: its prompt as
evaluated (`FederatedRun.evaluate` at the run's last evaluation round), answering with the
softmax over the protocol's seen classes (every class under personalized, the base classes
under base2novel: the classes it was trained to tell apart; the attack's input needs the same
classes for every client and run).

- members: c's training examples (`fed.split.train[c]`);
- non-members (`nonmember_pool`, `pick_nonmembers`): training-split examples of the protocol's
  train pool that no client was dealt (few-shot partitions leave most of them), so no client's
  update ever touched them (an example of another client's share could shape c's prompt
  through the shared part, so it is neither); where the partition deals every training
  example of the seen classes (--shots 0), the test split (its test pool) instead. For each of
  c's classes, as many as c has members of that class (fewer where fewer exist), drawn without
  replacement from a seeded stream, from c's own domains when the source has several; the
  `nonmembers` column says which split.

What the attacker sees. The attacks use only the released model's answers to queries of
examples with their labels, and both know the public frozen backbone:
- `server` trust (a trusted aggregator): an outsider holds what is released, each client's
  personalized prompt (local and shared parts) and the server's shared prompt (OUT/prompts),
  and queries it; the uploads stay inside the trusted server.
- `client` trust (an untrusted server): the attacker also holds every upload (each client's
  noised updates); these attacks do not use them, so under client trust they bound the
  attacker from below. docs/audit.md's canary audit is the attacker on the updates.
- The loss attack also knows the membership of half of the target's queries (to choose its
  threshold); the shadow attack knows the configuration and trains its own runs on data from
  the same dataset (other seeds' partitions may hold the target's examples: Shokri et al.
  assume the shadow data disjoint from the target's, the DP-FPL reference does not).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fpl_bench.catalog import MethodChoice
from fpl_bench.driver import FeatureSet, FederatedRun, Federation
from fpl_bench.errors import UsageError
from fpl_bench.input_canaries import INPUT_CANARIES, canary_rows, draw_canaries, with_canaries
from fpl_bench.prepare import Prepared
from fpl_bench.privacy.audit_bound import best_epsilon_lower_bound
from fpl_bench.privacy.canary_audit import AuditSetting, Variant, run_canary_audit
from fpl_bench.privacy.membership import (
    AttackResult,
    Outputs,
    TooFewQueries,
    loss_threshold_attack,
    shadow_model_attack,
)
from fpl_bench.report.audits import AUDIT_FILE
from fpl_bench.report.records import KEY_COLUMNS as RUN_KEY_COLUMNS
from fpl_bench.spec import ExperimentSpec

ATTACKS: tuple[str, ...] = ("loss", "shadow", "canary", "input")
MEMBERSHIP_ATTACKS: tuple[str, ...] = ("loss", "shadow")  # attacks on the released model
# Not the accuracy runs' experiment: a leaderboard read from MLflow takes every run of that
# one as an accuracy record (fpl_bench/report/sources.py), as tuning keeps its own too.
AUDIT_EXPERIMENT = "fpl-bench-audit"
# a run's results.csv key, then the attack's; shadow_runs: the runs that trained the attack
KEY_COLUMNS: tuple[str, ...] = (*RUN_KEY_COLUMNS, "attack", "shadow_runs")
AUDIT_COLUMNS: tuple[str, ...] = (
    *KEY_COLUMNS,
    "balanced_acc",
    "auc",
    "tpr_at_1fpr",
    "n_members",
    "n_nonmembers",
    "nonmembers",
    # the canary attack's: the one-run lower bound on epsilon (95%), its guesses and the
    # right ones (empty for the membership attacks, whose metrics above it leaves empty)
    "eps_lower",
    "guesses",
    "correct",
    "run_id",  # the audited run's MLflow run (results.csv's mlflow_run_id)
    "mlflow_run_id",  # this row's own MLflow run, in experiment AUDIT_EXPERIMENT
)
# Columns added after audit.csv was first written: an older file reads with them empty.
LATER_AUDIT_COLUMNS: tuple[str, ...] = ("eps_lower", "guesses", "correct")
EVAL_CHUNK = 512  # images per logits call
CANARIES = 1000  # m of the canary attack (docs/audit.md's default setting)
CANARY_DIM = 1024  # d, the simulated parameter space (>= m)


def shadow_seeds(targets: tuple[int, ...], count: int) -> tuple[int, ...]:
    """The `count` smallest non-negative seeds not in `targets`.

    >>> shadow_seeds((0, 2), 3)
    (1, 3, 4)
    """
    out: list[int] = []
    seed = 0
    while len(out) < count:
        if seed not in targets:
            out.append(seed)
        seed += 1
    return tuple(out)


@dataclass(frozen=True)
class AuditJob:
    """An audit: `spec` (seeds: `targets`, then the shadow seeds) and the attacks to run."""

    spec: ExperimentSpec
    targets: tuple[int, ...]
    attacks: tuple[str, ...]

    def shadow_runs(self, attack: str) -> int:
        """The runs that train `attack` (audit.csv's `shadow_runs`): every other seed's for
        the shadow attack, none for the loss attack."""
        return len(self.spec.seeds) - 1 if attack == "shadow" else 0


@dataclass(frozen=True)
class RunQueries:
    """A run's answers to its membership queries, and the split its non-members came from."""

    outputs: Outputs
    nonmembers: str  # "train" (dealt to no client) or "test"


# -- queries --------------------------------------------------------------------------------


def nonmember_pool(prep: Prepared, fed: Federation) -> tuple[str, FeatureSet, np.ndarray]:
    """(split name, its features, candidate indices): the train pool's examples of seen
    classes dealt to no client, else the test pool's examples of seen classes."""
    seen = fed.protocol.seen_classes
    train_labels = np.asarray(prep.splits.train.labels)
    pool = fed.protocol.train_pool
    pool = np.arange(len(train_labels)) if pool is None else np.asarray(pool)
    undealt = np.setdiff1d(pool, np.concatenate([np.asarray(t) for t in fed.split.train]))
    undealt = undealt[np.isin(train_labels[undealt], seen)]
    if undealt.size:
        return "train", prep.train, undealt
    test_labels = np.asarray(prep.splits.test.labels)
    pool = fed.protocol.test_pool
    pool = np.arange(len(test_labels)) if pool is None else np.asarray(pool)
    return "test", prep.test, pool[np.isin(test_labels[pool], seen)]


def pick_nonmembers(
    member_labels: np.ndarray,
    candidates: np.ndarray,
    candidate_labels: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """For each class among `member_labels`, as many of `candidates` of that class as there
    are members of it (all of them where fewer), without replacement; sorted."""
    chosen = [np.empty(0, dtype=np.int64)]
    classes, counts = np.unique(member_labels, return_counts=True)
    for label, count in zip(classes, counts, strict=True):
        same = candidates[candidate_labels == label]
        chosen.append(rng.choice(same, size=min(int(count), same.size), replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _domains(prep: Prepared, split: str, idx: np.ndarray) -> np.ndarray | None:
    domains = getattr(prep.splits, split).domains
    return None if domains is None else np.asarray(domains)[idx]


@torch.no_grad()
def _probabilities(
    run: FederatedRun, client: int, rnd: int, queries: list[tuple[FeatureSet, np.ndarray]]
) -> list[np.ndarray]:
    """[len(idx), n_seen] softmax of client `client`'s model, as evaluated at round `rnd`, for
    each (features, idx) of `queries`."""
    method, ctx = run.method, run.ctx_seen
    step, aux = run.eval_params(client, rnd)  # exactly the parameters that were scored
    encoded = method.encode(step, aux, ctx)
    out = []
    for features, idx in queries:
        parts = [np.zeros((0, len(run.fed.protocol.seen_classes)), dtype=np.float32)]
        for start in range(0, len(idx), EVAL_CHUNK):
            chunk = torch.as_tensor(idx[start : start + EVAL_CHUNK], device=features.labels.device)
            pooled, tokens, _ = features.take(chunk, embedded=method.prompts_image_tower)
            logits = method.logits(encoded, pooled, tokens, ctx)
            parts.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
        out.append(np.concatenate(parts))
    return out


def run_queries(prep: Prepared, choice: MethodChoice, seed: int, saved: Any) -> RunQueries:
    """Every client's members and non-members of the run of `choice` at `seed` whose released
    parameters are `saved` (a `SavedPrompts`), answered by that client's model."""
    from fpl_bench.experiment import federated_run, schedule_of
    from fpl_bench.method import build_method
    from fpl_bench.prepare import federation
    from fpl_bench.saved_prompts import load_into

    fed = federation(prep, seed)
    run = federated_run(prep, fed, build_method(choice), seed, schedule_of(prep.spec))
    load_into(run, saved)
    source, features, candidates = nonmember_pool(prep, fed)
    labels = {
        "train": np.asarray(prep.splits.train.labels),
        source: np.asarray(getattr(prep.splits, source).labels),
    }
    seen = fed.protocol.seen_classes
    parts = []
    for client in range(fed.split.n_clients):
        members = np.array(fed.split.train[client], dtype=np.int64)  # a writable copy
        pool = candidates
        mine = _domains(prep, "train", members)
        theirs = _domains(prep, source, candidates)
        if mine is not None and theirs is not None:
            pool = candidates[np.isin(theirs, mine)]
        rng = np.random.default_rng([seed, client])
        outside = pick_nonmembers(labels["train"][members], pool, labels[source][pool], rng)
        queried = [(prep.train, members), (features, outside)]
        probs = _probabilities(run, client, saved.eval_round, queried)
        classes = np.concatenate([labels["train"][members], labels[source][outside]])
        parts.append(
            Outputs(
                probs=np.concatenate(probs),
                labels=np.searchsorted(seen, classes),
                is_member=np.arange(len(classes)) < len(members),
            )
        )
    return RunQueries(Outputs.concat(parts), source)


# -- audit.csv ------------------------------------------------------------------------------


def read_audit(path: Path) -> pd.DataFrame | None:
    """OUT/audit.csv, or None where there is none; UsageError (one line) for a file that is not
    one (a folder, or other columns)."""
    if not path.exists():
        return None
    if not path.is_file():
        raise UsageError(f"{path} is not a file; move it away or use another --out")
    try:
        frame = pd.read_csv(path, dtype={"eps": str, "config_hash": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: not a CSV file ({type(err).__name__}); move it away") from None
    frame = frame.assign(**{c: np.nan for c in LATER_AUDIT_COLUMNS if c not in frame.columns})
    missing = [c for c in AUDIT_COLUMNS if c not in frame.columns]
    if missing:
        raise UsageError(
            f"{path} lacks the columns {', '.join(missing)}; move it away or use another --out"
        )
    return frame


def _same_key(frame: pd.DataFrame, row: dict[str, Any]) -> np.ndarray:
    """Which rows of `frame` have the key of `row`."""
    same = np.ones(len(frame), dtype=bool)
    for column in KEY_COLUMNS:
        same &= frame[column].astype(str).to_numpy() == str(row[column])
    return same


def _upsert(existing: pd.DataFrame | None, row: dict[str, Any]) -> pd.DataFrame:
    """`existing` with `row` in place of the row of the same key (appended where none)."""
    new = pd.DataFrame([row], columns=list(AUDIT_COLUMNS))
    if existing is None or existing.empty:
        return new
    return pd.concat([existing[~_same_key(existing, row)], new], ignore_index=True)


def _done(existing: pd.DataFrame | None, key: dict[str, Any], run_id: str) -> dict | None:
    """The row of `existing` with this key for the same audited run, if any."""
    if existing is None or existing.empty:
        return None
    match = existing[_same_key(existing, key) & (existing["run_id"].astype(str) == str(run_id))]
    return None if match.empty else match.iloc[-1].to_dict()


# -- the job --------------------------------------------------------------------------------


def run_audit(
    job: AuditJob,
    *,
    log: Callable[[str], None] = print,
    progress: Any = None,
) -> pd.DataFrame:
    """Train the job's runs not finished in OUT, attack every finished target run and write
    OUT/audit.csv (a row with the same key and audited run is kept, not recomputed); returns
    the job's rows."""
    from fpl_bench.experiment import run_experiment
    from fpl_bench.jobs import output_lock
    from fpl_bench.report.records import read_results
    from fpl_bench.run_records import finished_row, run_key, run_name
    from fpl_bench.tracking import Tracker

    spec = job.spec
    out = Path(spec.out)
    path = out / AUDIT_FILE
    existing = read_audit(path)  # refused before any training
    run_experiment(spec, log=log, progress=progress)
    auditor = _Auditor(job, read_results(out / "results.csv"), log)
    rows: list[dict[str, Any]] = []
    with output_lock(out):
        tracker = Tracker(out, experiment=AUDIT_EXPERIMENT)
        for m, e, seed in product(range(len(spec.methods)), range(len(spec.eps)), job.targets):
            key = run_key(spec, spec.methods[m], spec.eps[e], seed)
            name = run_name(key)
            target = finished_row(auditor.results, key)
            if target is None:
                log(f"{name}: not finished (diverged or failed); not audited")
                continue
            for attack in job.attacks:
                row_key = _row_key(key, attack, job.shadow_runs(attack))
                done = _done(existing, row_key, target["mlflow_run_id"])
                if done is not None:
                    log(f"{name}: {attack} attack done by an earlier audit; kept")
                    rows.append(done)
                    continue
                found, message = auditor.columns(attack, target, m, e, seed)
                log(f"{name}: {message}")
                if found is None:
                    continue
                row = {**row_key, **found, "run_id": target["mlflow_run_id"]}
                row["mlflow_run_id"] = _track(tracker, f"{name}-{attack}", key, row)
                existing = _upsert(existing, row)
                _write(existing, path)
                rows.append(row)
    return pd.DataFrame(rows, columns=list(AUDIT_COLUMNS))


class _Auditor:
    """A job's runs as the attacks need them: each finished run's queries, computed once
    (the data and backbone prepared at the first)."""

    def __init__(self, job: AuditJob, results: pd.DataFrame, log: Callable[[str], None]):
        self.job, self.results, self.log = job, results, log
        self.prep: Prepared | None = None
        self.cache: dict[tuple[int, int, int], RunQueries | None] = {}

    def queries(self, m: int, e: int, seed: int) -> RunQueries | None:
        """The queries of the run of method m, eps e, `seed` (None: it did not finish)."""
        from fpl_bench.run_records import finished_row, run_key
        from fpl_bench.saved_prompts import load_prompts

        spec = self.job.spec
        if (m, e, seed) not in self.cache:
            row = finished_row(self.results, run_key(spec, spec.methods[m], spec.eps[e], seed))
            found = None
            if row is not None:
                saved = load_prompts(_prompts_path(Path(spec.out), row))
                found = run_queries(self.prepared(), spec.methods[m], seed, saved)
            self.cache[(m, e, seed)] = found
        return self.cache[(m, e, seed)]

    def prepared(self) -> Prepared:
        """The job's data and backbone, prepared at the first call."""
        from fpl_bench.prepare import prepare

        if self.prep is None:
            self.prep = prepare(self.job.spec, self.log)
        return self.prep

    def columns(
        self, attack: str, target: dict[str, Any], m: int, e: int, seed: int
    ) -> tuple[dict[str, Any] | None, str]:
        """audit.csv's columns of `attack` on the finished run (m, e, seed) whose results.csv
        row is `target`, and the line to log; None where the attack does not apply."""
        spec = self.job.spec
        if attack == "canary":
            found = canary_row(target, momentum=spec.momentum)
            if found is None:
                return None, "no noisy step (no DP, or nothing trained); canary attack not run"
            return found, f"canary attack: eps >= {found['eps_lower']:.3f} (95%)"
        if attack == "input":
            found = input_canary_row(self.prepared(), spec.methods[m], spec.eps[e], seed)
            return found, f"input canaries: eps >= {found['eps_lower']:.3f} (95%)"
        mine = self.queries(m, e, seed)
        assert mine is not None  # its run finished
        try:
            result = self.attack(attack, mine, m, e, seed)
        except TooFewQueries as err:
            return None, f"{attack} attack not run: {err}"
        if result is None:
            return None, "no other run finished; shadow attack not run"
        return {**_metrics(result), "nonmembers": mine.nonmembers}, _summary(result)

    def attack(
        self, attack: str, mine: RunQueries, m: int, e: int, seed: int
    ) -> AttackResult | None:
        """One attack on the finished run (m, e, seed) whose queries are `mine`; None for the
        shadow attack where no other seed's run finished (a run never shadows itself)."""
        if attack == "loss":
            return loss_threshold_attack(mine.outputs, seed=seed)
        others = [self.queries(m, e, s) for s in self.job.spec.seeds if s != seed]
        shadows = [q.outputs for q in others if q is not None]
        if not shadows:
            return None
        return shadow_model_attack(Outputs.concat(shadows), mine.outputs, seed=seed)


def canary_setting(target: dict[str, Any], *, momentum: float) -> AuditSetting | None:
    """The canary audit of one finished run (`privacy/canary_audit.py`): its ledger's client
    (sample rate q, noisy steps T), target eps, delta and C, the run's client count and
    momentum, `CANARIES` canaries in `CANARY_DIM` dimensions; None for a run without DP or
    without a noisy step (a method that trains nothing, such as zeroshot, at an eps).
    sigma is calibrated by the RDP accountant for that client's (q, T) alone, so the audited
    mechanism has at most the run's noise (its sigma serves every client)."""
    eps, steps, rate = (target.get(k) for k in ("eps_target", "steps", "sample_rate"))
    if any(v is None or not np.isfinite(float(v)) for v in (eps, steps, rate)) or steps < 1:
        return None  # no DP, or nothing trained under it (zeroshot): no noisy step
    return AuditSetting(
        canaries=CANARIES,
        dim=CANARY_DIM,
        steps=int(target["steps"]),
        sample_rate=float(target["sample_rate"]),
        clients=int(target["clients"]),
        eps=float(eps),
        delta=float(target["delta"]),
        clip_norm=float(target["clip_norm"]),
        momentum=float(momentum),
    )


def canary_row(target: dict[str, Any], *, momentum: float) -> dict[str, Any] | None:
    """audit.csv's columns of the canary attack on one finished run (its results.csv row):
    the white-box one-run audit of the mechanism at the run's settings (`canary_setting`),
    the attacker its trust model allows, the run's seed; None without DP."""
    setting = canary_setting(target, momentum=momentum)
    if setting is None:
        return None
    audit = run_canary_audit(
        setting, Variant.CORRECT, str(target["trust"]), seed=int(target["seed"])
    )
    return {
        **dict.fromkeys(_METRICS, np.nan),
        "nonmembers": "canaries",
        "eps_lower": audit.bound.epsilon,
        "guesses": audit.bound.guesses,
        "correct": audit.bound.correct,
    }


def input_canary_row(
    prep: Prepared, choice: MethodChoice, eps: float | None, seed: int, m: int = INPUT_CANARIES
) -> dict[str, Any]:
    """audit.csv's columns of the input-canary attack (`fpl_bench/input_canaries.py`): one
    more run of `choice` at `eps` and `seed`, its clients' data holding `m` mislabeled canaries (each in with probability 1/2), the noise calibrated for those sizes;
    each canary scored by its client's released model; the one-run bound at 95%, and the
    scores' membership metrics (members: the included canaries)."""
    from fpl_bench.experiment import job_run
    from fpl_bench.prepare import federation

    fed = federation(prep, seed)
    source_name, source, candidates = nonmember_pool(prep, fed)
    labels = np.asarray(getattr(prep.splits, source_name).labels)
    canaries = draw_canaries(candidates, labels[candidates], fed.split.classes, m=m, seed=seed)
    grown = with_canaries(fed, source, canaries)
    run, _ = job_run(prep, grown, choice, eps, seed)
    run.run(evaluate=False)
    last = prep.spec.rounds - 1 if run.method.trains else 0
    rows = canary_rows(fed, canaries)
    seen = np.asarray(fed.protocol.seen_classes)
    probs = np.zeros((canaries.m, len(seen)), dtype=np.float32)
    for client in range(fed.split.n_clients):
        mine = np.flatnonzero(canaries.client == client)
        if mine.size:
            (probs[mine],) = _probabilities(run, client, last, [(grown.train, rows[mine])])
    outputs = Outputs(
        probs=probs, labels=np.searchsorted(seen, canaries.label), is_member=canaries.included
    )
    # scores Y_j = log p(canary label): the loss attack's, whose metrics the row keeps too
    bound = best_epsilon_lower_bound(-outputs.losses(), canaries.included, prep.spec.delta)
    return {
        **_metrics(loss_threshold_attack(outputs, seed=seed)),
        "nonmembers": f"canaries ({source_name})",
        "eps_lower": bound.epsilon,
        "guesses": bound.guesses,
        "correct": bound.correct,
    }


def _row_key(key: dict[str, Any], attack: str, shadow_runs: int) -> dict[str, Any]:
    """An audit.csv key from a run's record key."""
    from fpl_bench.report.records import normalize_eps

    return {**key, "eps": normalize_eps(key["eps"]), "attack": attack, "shadow_runs": shadow_runs}


def _prompts_path(out: Path, row: dict[str, Any]) -> Path:
    """The prompts file of a finished results.csv row; UsageError where the row names none or
    the file is gone."""
    name = row.get("prompts")
    run = f"the finished run {row['method']} eps {row['eps']} seed {row['seed']}"
    if not isinstance(name, str) or not name.strip():
        raise UsageError(
            f"{out / 'results.csv'}: {run} names no prompts file (written by an older "
            "fpl-bench?); audit into another --out"
        )
    if not (out / name).is_file():
        raise UsageError(
            f"{out / name}: the prompts of {run} are missing; audit into another --out"
        )
    return out / name


_METRICS = ("balanced_acc", "auc", "tpr_at_1fpr", "n_members", "n_nonmembers")


def _metrics(result: AttackResult) -> dict[str, float | int]:
    """The row's columns of an attack's result."""
    return {name: getattr(result, name) for name in _METRICS}


def _summary(result: AttackResult) -> str:
    return (
        f"{result.attack} attack: balanced acc {result.balanced_acc:.3f}, AUC {result.auc:.3f}, "
        f"TPR at 1% FPR {result.tpr_at_1fpr:.3f} ({result.n_members} members, "
        f"{result.n_nonmembers} non-members)"
    )


def _track(tracker: Any, name: str, key: dict[str, Any], row: dict[str, Any]) -> str:
    """One finished MLflow run for one audit row; returns its id."""
    tags = {
        **{k: str(row[k]) for k in ("method", "dataset", "eps", "trust", "seed", "attack")},
        "fpl.role": "canary" if row["attack"] == "canary" else "membership",
        "fpl.audited_run": str(row["run_id"]),
    }
    params = {**key, "shadow_runs": row["shadow_runs"], "nonmembers": row["nonmembers"]}
    run_id = tracker.start(name, params, tags)
    names = ("eps_lower", "guesses", "correct") if row["attack"] == "canary" else _METRICS
    tracker.finish(run_id, {k: float(row[k]) for k in names}, {})
    return run_id


def _write(frame: pd.DataFrame, path: Path) -> None:
    from fpl_bench.io import write_atomic

    write_atomic(path, lambda tmp: frame[list(AUDIT_COLUMNS)].to_csv(tmp, index=False))
