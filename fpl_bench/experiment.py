"""From an ExperimentSpec to results: data, backbone, features, partitions, runs, records.

prepare(spec)           dataset splits, backbone, cached image features, text tower
federation(prep, seed)  the protocol and the seeded client partition (saved with the run)
run_one(...)            one method x eps x seed: privacy plan, federated run, MLflow run
run_experiment(spec)    all of them; results.csv is rewritten (rows replaced by key) after
                        every run, so an interrupted job keeps what it finished
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from typing import Protocol as Interface

import numpy as np
import pandas as pd
import torch

from fpl_bench.backbone import Backbone, load_backbone
from fpl_bench.cards import dataset_card
from fpl_bench.catalog import MethodChoice
from fpl_bench.compute import (
    PARALLEL_FLOPS,
    busy_cores_elsewhere,
    pick_threads,
    resolve_precision,
    usable_cores,
)
from fpl_bench.data.partition import ClientSplit, few_shot, make_partitioner
from fpl_bench.data.sources import Splits, load_source
from fpl_bench.driver import (
    Diverged,
    FeatureSet,
    FederatedRun,
    Federation,
    NoisePlan,
    RunOutput,
    Schedule,
    client_schedule,
)
from fpl_bench.errors import UsageError
from fpl_bench.evaluate import final_metrics
from fpl_bench.features import image_features
from fpl_bench.learners import LEARNERS
from fpl_bench.method import Method, build_method
from fpl_bench.parallel import (
    job_workers,
    run_parallel,
    threads_per_worker,
    warm_workers_if_needed,
)
from fpl_bench.privacy.accountant import PrivacyLedger, use_calibration_cache
from fpl_bench.privacy.planning import (
    check_delta,
    check_epsilons,
    client_budgets,
    plan_for_clients,
    steps_per_round,
)
from fpl_bench.prompt import TextTower
from fpl_bench.protocols import Protocol, domain_protocol, make_protocol
from fpl_bench.report.records import (
    METRIC_COLUMNS,
    RESULT_COLUMNS,
    normalize_eps,
    read_results,
    upsert_results,
    write_results,
)
from fpl_bench.schemes import SCHEMES
from fpl_bench.spec import ExperimentSpec


class JobProgress(Interface):
    """What the CLI shows: run k of N, round r of R (and from both, an ETA for the job)."""

    def start_run(self, index: int, total: int, label: str, rounds: int) -> None: ...

    def advance(self, rounds_done: int) -> None: ...


@dataclass
class Prepared:
    spec: ExperimentSpec
    splits: Splits
    backbone: Backbone
    tower: TextTower
    train: FeatureSet
    test: FeatureSet
    device: torch.device
    partitions: dict[int, tuple[Protocol, ClientSplit]]
    transfers: list[Transfer] = field(default_factory=list)


@dataclass
class Transfer:
    """A cross-dataset target: its text tower (its class names) and its test features."""

    dataset: str
    tower: TextTower
    test: FeatureSet


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda: no CUDA device is visible; use device cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


CPU_THREADS = torch.get_num_threads()


def set_threads(
    spec: ExperimentSpec,
    *,
    private: bool,
    device: torch.device,
    tower: TextTower | None = None,
    n_classes: int | None = None,
) -> None:
    """CPU threads for one run, by the measured size of its steps (fpl_bench/compute.py): the
    FLOPs of one local step (B tower passes when private, 1 otherwise) over `n_classes`;
    more than one thread only for large steps and only on cores other processes leave idle.
    Without a tower (callers that do not pass one): one thread, all when private."""
    if device.type != "cpu":
        return
    if spec.threads:
        torch.set_num_threads(spec.threads)
        return
    if tower is None:
        torch.set_num_threads(CPU_THREADS if private else 1)
        return
    flops = tower.pass_flops(n_classes or tower.n_classes) * (spec.batch_size if private else 2)
    cores = min(CPU_THREADS, usable_cores())
    busy = busy_cores_elsewhere() if flops >= PARALLEL_FLOPS else 0.0
    torch.set_num_threads(pick_threads(flops, cores=cores, busy_elsewhere=busy))


def build_methods(spec: ExperimentSpec) -> list[Method]:
    """Every method of the job, built (pair validity checked) before any data is touched."""
    return [build_method(choice) for choice in spec.methods]


def prepare(spec: ExperimentSpec, log: Callable[[str], None] = print) -> Prepared:
    device = resolve_device(spec.device)
    use_calibration_cache(Path(spec.cache_dir) / "noise")
    with_tokens = any(LEARNERS.get(m.learner).needs_tokens for m in spec.methods)
    card = dataset_card(spec.dataset_source())
    for name in spec.transfer_datasets:  # an unknown name is refused before any encoding
        dataset_card(name)
    backbone = load_backbone(
        spec.backbone, pretrained=spec.pretrained, checkpoint=spec.checkpoint, device=str(device)
    )
    splits = load_source(
        card, root=spec.data_root, options=spec.dataset_options, cache_dir=spec.cache_dir
    )
    # Everything that can be refused from the labels alone is refused before any encoding.
    partitions = {seed: partition_clients(spec, splits, seed) for seed in spec.seeds}
    if any(e is not None for e in spec.eps):
        for _, split in partitions.values():
            check_delta(spec.delta, [len(idx) for idx in split.train])
        if any(LEARNERS.get(m.learner).trains for m in spec.methods):
            for seed, (_, split) in partitions.items():
                budgets = _budgets(spec, split, seed)
                check_epsilons(spec.eps, budgets, delta=spec.delta, calibration=spec.accountant)
                if spec.accountant == "paper":  # a closed form: its refusal costs nothing now
                    for eps in (e for e in spec.eps if e is not None):
                        plan_for_clients(
                            budgets,
                            eps=eps,
                            delta=spec.delta,
                            clip_norm=spec.clip_norm,
                            rounds=spec.rounds,
                            calibration="paper",
                        )
    tower = _text_tower(spec, backbone, splits.classnames, device)  # checks ctx_init
    # the input is accepted: from here a log shows the job's progress (bad input stays one line)
    log(
        f"{spec.dataset}: {len(splits.train.labels)} training images of "
        f"{len(splits.classnames)} classes, {spec.clients} clients; preparing image features..."
    )
    sets = {
        split: _features(spec, backbone, splits, split, with_tokens, device, log)
        for split in ("train", spec.eval_split)
    }
    transfers = [
        _transfer(spec, name, backbone, with_tokens, device, log) for name in spec.transfer_datasets
    ]
    return Prepared(
        spec,
        splits,
        backbone,
        tower,
        sets["train"],
        sets[spec.eval_split],
        device,
        partitions,
        transfers,
    )


def _budgets(spec: ExperimentSpec, split: ClientSplit, seed: int) -> list[tuple[float, int]]:
    """(q, noisy steps) per client of a run of `spec` on `split`: FederatedRun.budget()."""
    n_train = [len(idx) for idx in split.train]
    schedule = client_schedule(
        len(n_train), rounds=spec.rounds, fraction=spec.client_fraction, seed=seed
    )
    return client_budgets(
        n_train, batch_size=spec.batch_size, local_epochs=spec.local_epochs, schedule=schedule
    )


def _features(spec, backbone, splits, split, with_tokens, device, log) -> FeatureSet:
    images = getattr(splits, split)
    t0 = time.perf_counter()
    pooled, tokens, hit = image_features(
        backbone,
        images,
        data_fingerprint=splits.fingerprint,
        split=split,
        cache_dir=spec.cache_dir,
        with_tokens=with_tokens,
    )
    log(
        f"image features [{split}] {tuple(pooled.shape)} "
        f"{'from cache' if hit else f'encoded in {time.perf_counter() - t0:.1f}s'}"
    )
    return FeatureSet(
        pooled=pooled.to(device),
        tokens=tokens.to(device) if with_tokens else None,
        labels=torch.as_tensor(np.array(images.labels), dtype=torch.long, device=device),
    )


def _text_tower(
    spec: ExperimentSpec, backbone: Backbone, classnames: Sequence[str], device: torch.device
) -> TextTower:
    """The frozen text tower over `classnames` at the spec's context length and precision;
    UsageError when `ctx_init` is not `n_ctx` tokens (the context would start at random)."""
    tower = TextTower.build(
        backbone.model,
        backbone.tokenizer,
        classnames,
        n_ctx=spec.n_ctx,
        precision=resolve_precision(spec.precision, device),
    )
    if spec.ctx_init:
        tokens = tower.embed_phrase(spec.ctx_init).shape[0]
        if tokens != spec.n_ctx:
            raise UsageError(
                f"--ctx-init {spec.ctx_init!r} is {tokens} tokens but --n-ctx is {spec.n_ctx}: "
                f"give --n-ctx {tokens}, or another phrase"
            )
    return tower


def _transfer(spec, name, backbone, with_tokens, device, log) -> Transfer:
    """Load a cross-dataset target: its test split's features and a tower over its classes."""
    splits = load_source(
        dataset_card(name), root=spec.data_root, options={}, cache_dir=spec.cache_dir
    )
    test = _features(spec, backbone, splits, "test", with_tokens, device, log)
    tower = _text_tower(spec, backbone, splits.classnames, device)
    return Transfer(dataset=name, tower=tower, test=test)


def transfer_accuracy(run: FederatedRun, target: Transfer, seed: int) -> float:
    """Mean over clients of the accuracy of each client's trained prompt on every test image of
    `target`, with logits over its classes (the learner's constants rebuilt for its classes)."""
    labels = target.test.labels.cpu().numpy()
    protocol = make_protocol("transfer", n_classes=target.tower.n_classes, test_labels=labels)
    everything = np.arange(len(labels))
    n = len(run.clients)
    split = ClientSplit(
        train=(everything,) * n,
        test=(everything,) * n,
        classes=(protocol.seen_classes,) * n,
    )
    fed = Federation(train=target.test, test=target.test, split=split, protocol=protocol)
    scorer = FederatedRun(run.method, target.tower, fed, schedule=run.sched, seed=seed)
    scorer.load_state_dict(run.state_dict())
    metrics, _ = scorer.evaluate(0)
    return metrics["target_acc"]


def federation(prep: Prepared, seed: int) -> Federation:
    """The data of one seed's runs: features, protocol and client partition."""
    protocol, split = prep.partitions[seed]
    return Federation(train=prep.train, test=prep.test, split=split, protocol=protocol)


def partition_clients(spec: ExperimentSpec, splits: Splits, seed: int) -> tuple:
    """The protocol and the seeded, few-shot client partition of its seen classes (of the
    train / test images the protocol lets be dealt: cross-domain keeps its target out)."""
    evaluated = getattr(splits, spec.eval_split)  # the test split, or val when tuning
    n_classes = len(splits.classnames)
    if spec.protocol in ("multi-domain", "cross-domain"):
        protocol = domain_protocol(
            spec.protocol,
            n_classes=n_classes,
            test_labels=evaluated.labels,
            test_domains=evaluated.domains,
            train_domains=splits.train.domains,
            domain_names=splits.domain_names,
            target_domain=spec.target_domain,
        )
    else:
        if spec.target_domain is not None:
            raise UsageError("target_domain applies to the cross-domain protocol only")
        protocol = make_protocol(spec.protocol, n_classes=n_classes, test_labels=evaluated.labels)
    train_pool = _pool(protocol.train_pool, len(splits.train.labels))
    test_pool = _pool(protocol.test_pool, len(evaluated.labels))
    domains = {}
    n_domains = None
    if spec.partition == "by_domain":
        # renumber the domains present in the pools to 0..k-1 (cross-domain drops its target)
        kept = np.unique(splits.train.domains[train_pool])
        renumber = np.full(len(splits.domain_names), -1)
        renumber[kept] = np.arange(len(kept))
        n_domains = len(kept)
        domains = {
            "train_domains": renumber[splits.train.domains[train_pool]],
            "test_domains": renumber[evaluated.domains[test_pool]],
        }
    partitioner = make_partitioner(
        spec.partition, n_clients=spec.clients, alpha=spec.alpha, seed=seed, n_domains=n_domains
    )
    local = partitioner.split(
        splits.train.labels[train_pool],
        evaluated.labels[test_pool],
        protocol.seen_classes,
        **domains,
    )
    split = ClientSplit(
        train=tuple(train_pool[idx] for idx in local.train),
        test=tuple(test_pool[idx] for idx in local.test),
        classes=local.classes,
    )
    return protocol, few_shot(split, splits.train.labels, shots=spec.shots, seed=seed)


def _pool(pool: np.ndarray | None, n: int) -> np.ndarray:
    return np.arange(n) if pool is None else np.asarray(pool)


def plan_run_privacy(run: FederatedRun, spec: ExperimentSpec, eps: float) -> PrivacyLedger:
    """One sigma for every client of the run (fpl_bench/privacy/planning.py)."""
    return plan_for_clients(
        run.budget(),
        eps=eps,
        delta=spec.delta,
        clip_norm=spec.clip_norm,
        rounds=spec.rounds,
        calibration=spec.accountant,
    )


def run_config(spec: ExperimentSpec, choice: MethodChoice) -> dict[str, Any]:
    """The resolved configuration of one method's runs (without eps and seed): what the
    config hash covers, and the MLflow params."""
    cfg = spec.model_dump(
        mode="json",
        exclude={
            "methods",
            "eps",
            "seeds",
            "out",
            "cache_dir",
            "data_root",
            "threads",
            "workers",
            "device",
            "precision",
            "resume",
            "tuned_from",
            "dataset_card",
        },
    )
    if spec.dataset_card is not None:  # a card of one's own: its content, and where it lies
        card = dataset_card(spec.dataset_source())
        blob = card.model_dump_json().encode()
        cfg["dataset_card_sha256"] = hashlib.sha256(blob).hexdigest()[:16]
        cfg["dataset_card"] = str(spec.dataset_card)
    cfg.update({"method": choice.label, "learner": choice.learner, "scheme": choice.scheme})
    cfg.update(choice.options())
    return cfg


# What a method's own config adds to the job's setup: excluded from the setup hash.
_METHOD_FIELDS = ("method", "learner", "scheme", "tuned")


def setup_hash(spec: ExperimentSpec) -> str:
    """The hash of the job's setup: the resolved configuration without the method (its name,
    learner, scheme and options) and without whether it was tuned. Rows with one setup hash
    ran on the same data, protocol, partition, schedule, backbone and privacy settings, so a
    leaderboard table holds one setup only. A tuned spec keeps the setup of the spec it was
    tuned from (`tuned_from`): its tuned values are part of its method's configuration."""
    if spec.tuned_from is not None:
        return spec.tuned_from
    cfg = run_config(spec, spec.methods[0])
    for name in (*_METHOD_FIELDS, *spec.methods[0].options()):
        cfg.pop(name, None)
    return config_hash(cfg)


def run_key(spec: ExperimentSpec, choice: MethodChoice, eps: float | None, seed: int) -> dict:
    """The record key of one run (fpl_bench/report/records.py KEY_COLUMNS)."""
    return {
        "method": choice.label,
        "learner": choice.learner,
        "scheme": choice.scheme,
        "dataset": spec.dataset,
        "protocol": spec.protocol,
        "trust": spec.trust,
        "eps": "none" if eps is None else eps,
        "seed": seed,
        "config_hash": config_hash(run_config(spec, choice)),
    }


def _finished_row(previous: pd.DataFrame | None, key: dict[str, Any]) -> dict | None:
    """The finished row of `previous` with this key, if any (what --resume skips)."""
    if previous is None or previous.empty:
        return None
    match = previous["status"] == "finished"
    for column, value in key.items():
        if column == "eps":
            match &= previous["eps"].map(normalize_eps) == normalize_eps(value)
        else:
            match &= previous[column].astype(str) == str(value)
    rows = previous[match]
    return None if rows.empty else rows.iloc[-1].to_dict()


# Where a configuration's files lie, recorded so it can be run again but not hashed: the same
# card moved elsewhere is the same configuration (its content is hashed).
UNHASHED_KEYS: tuple[str, ...] = ("dataset_card",)


def config_hash(config: dict[str, Any]) -> str:
    hashed = {k: v for k, v in config.items() if k not in UNHASHED_KEYS}
    blob = json.dumps(hashed, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def provenance() -> dict[str, str]:
    """Package version and the git commit of the checkout it runs from ('' when not a git
    checkout, e.g. an installed wheel)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("fpl-bench")
    except PackageNotFoundError:
        pkg = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"version": pkg, "commit": commit}


def _privacy_columns(spec: ExperimentSpec, eps: float | None, ledger: PrivacyLedger | None) -> dict:
    if eps is None:
        return {"eps_target": math.nan, "eps_spent": math.nan, "delta": math.nan}
    if ledger is None:  # a method that trains nothing spends nothing
        return {"eps_target": eps, "eps_spent": 0.0, "delta": spec.delta, "steps": 0}
    return {
        "eps_target": eps,
        "eps_spent": ledger.eps_spent,
        "delta": spec.delta,
        "noise_multiplier": ledger.noise_multiplier,
        "clip_norm": spec.clip_norm,
        "sample_rate": ledger.sample_rate,
        "steps": ledger.steps,
        "calibration": ledger.calibration,
        "accountant": ledger.accountant,
    }


def schedule_of(spec: ExperimentSpec) -> Schedule:
    """The driver's schedule of a spec's runs."""
    return Schedule(
        rounds=spec.rounds,
        local_epochs=spec.local_epochs,
        batch_size=spec.batch_size,
        lr=spec.lr,
        momentum=spec.momentum,
        client_fraction=spec.client_fraction,
        eval_every=spec.eval_every,
    )


def federated_run(
    prep: Prepared, fed: Federation, method: Method, seed: int, schedule: Schedule
) -> FederatedRun:
    """One federated run of `method` as the spec sets it up (trust model, ctx_init)."""
    spec = prep.spec
    return FederatedRun(
        method,
        prep.tower,
        fed,
        schedule=schedule,
        seed=seed,
        trust=spec.trust,
        ctx_init=spec.ctx_init,
    )


def run_one(
    prep: Prepared,
    fed: Federation,
    choice: MethodChoice,
    eps: float | None,
    seed: int,
    tracker: Any,
    log: Callable[[str], None],
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    spec = prep.spec
    method = build_method(choice)
    schedule = schedule_of(spec)
    torch.manual_seed(seed)
    private = eps is not None and method.trains
    n_seen = len(fed.protocol.seen_classes)
    set_threads(spec, private=private, device=prep.device, tower=prep.tower, n_classes=n_seen)
    run = federated_run(prep, fed, method, seed, schedule)
    ledger = plan_run_privacy(run, spec, eps) if private else None
    if ledger is not None:
        run.enable_privacy(
            NoisePlan(
                noise_multiplier=ledger.noise_multiplier,
                clip_norm=spec.clip_norm,
                secure=spec.secure_noise,
            )
        )
    config = run_config(spec, choice)
    key = run_key(spec, choice, eps, seed)
    params = {**config, "eps": key["eps"], "seed": seed, "config_hash": key["config_hash"]}
    if ledger is not None:
        params.update({f"privacy.{k}": v for k, v in asdict(ledger).items()})
    run_name = f"{choice.label}-{spec.dataset}-{spec.trust}-eps{key['eps']}-seed{seed}"
    tags = {k: str(v) for k, v in key.items()}
    checkpoint = checkpoint_path(Path(spec.out), key)
    start, run_id = None, None
    if spec.resume and checkpoint.is_file():
        start, run_id = load_checkpoint(checkpoint, run, tracker)
        log(f"{run_name}: resuming after round {start.rounds_done} of {spec.rounds}")
        if progress:
            progress(start.rounds_done)
    if run_id is None:
        run_id = tracker.start(run_name, params, tags)

    def save_round(rounds_done: int, output: RunOutput) -> None:
        save_checkpoint(checkpoint, run, output, run_id)

    t0 = time.perf_counter()
    status = "failed"
    try:
        out = run.run(
            on_eval=lambda r, m: tracker.log_round(run_id, r, m),
            progress=progress,
            start=start,
            on_round_end=save_round if method.trains else None,
        )
        status = "finished"
    except Diverged as err:
        status = "diverged"
        log(f"{run_name}: diverged ({err}); recorded without accuracy")
    except KeyboardInterrupt:
        status = "killed"
        raise
    finally:
        if status in ("failed", "killed"):
            tracker.finish(
                run_id, {}, {}, status=status.upper(), tags={"status": status}, quiet=True
            )
    wall = time.perf_counter() - t0
    checkpoint.unlink(missing_ok=True)
    metrics = dict.fromkeys(METRIC_COLUMNS, math.nan)
    if status == "finished":
        final = final_metrics(
            [{k: v for k, v in h.items() if k not in ("round", "train_loss")} for h in out.history],
            spec.last_k,
        )
        if prep.transfers:  # cross-dataset: the trained prompts scored on every target
            final["target_acc"] = float(
                np.mean([transfer_accuracy(run, t, seed) for t in prep.transfers])
            )
        metrics.update({m: final.get(m, math.nan) for m in fed.protocol.metrics})
    privacy = _privacy_columns(spec, eps, ledger)
    artifacts: dict[str, Any] = {"partition.json": fed.split.to_json()}
    prompts_file = ""
    if status == "finished":
        artifacts["schedule.json"] = {"sampled_clients": out.schedule}
        artifacts["history.json"] = out.history
        saved = save_run_prompts(Path(spec.out), run, config, key, method.trains)
        artifacts["prompts.safetensors"] = saved
        prompts_file = str(saved.relative_to(spec.out))
    # columns of the row that MLflow's params do not already hold as they are: run tags too
    recorded = {
        "backbone": backbone_label(spec),
        "setup_hash": setup_hash(spec),
        "prompts": prompts_file,
    }
    tracker.finish(
        run_id,
        {
            **{f"final/{m}": v for m, v in metrics.items()},
            **{k: v for k, v in privacy.items() if isinstance(v, float | int)},
            "wall_s": wall,
        },
        artifacts,
        status="FINISHED" if status == "finished" else "FAILED",
        tags={"status": status, **recorded},
    )
    row = {
        **key,
        "status": status,
        **metrics,
        **privacy,
        "rounds": spec.rounds,
        "local_epochs": spec.local_epochs,
        "batch_size": spec.batch_size,
        "lr": spec.lr,
        "clients": spec.clients,
        "shots": spec.shots,
        **recorded,
        "tuned": spec.tuned,
        "secure_noise": spec.secure_noise,
        "wall_s": round(wall, 2),
        **provenance(),
        "mlflow_run_id": run_id,
    }
    shown = ", ".join(f"{m}={metrics[m]:.3f}" for m in fed.protocol.metrics)
    spent = f", eps_spent={privacy['eps_spent']:.3f}" if eps is not None else ""
    log(f"{run_name}: {status}, {shown}{spent} ({wall:.1f}s)")
    return row


CONFIGS_FOLDER = "configs"


def save_configs(spec: ExperimentSpec, out: Path) -> None:
    """OUT/configs/<config hash>.json: the resolved configuration of each method's runs (what
    the hash covers), so that a leaderboard can record it and `fpl-bench regress` can run the
    same configuration again (fpl_bench/report/sources.py load_configs)."""
    from fpl_bench.io import write_atomic

    for choice in spec.methods:
        config = run_config(spec, choice)
        blob = json.dumps(config, sort_keys=True, default=str)
        path = out / CONFIGS_FOLDER / f"{config_hash(config)}.json"
        if not path.is_file():
            write_atomic(path, lambda tmp, b=blob: Path(tmp).write_text(b))


def save_run_prompts(
    out: Path, run: FederatedRun, config: dict[str, Any], key: dict[str, Any], trains: bool
) -> Path:
    """OUT/prompts/<run>.safetensors: the run's final parameters, server's and every client's,
    with its configuration (fpl_bench/saved_prompts.py); `fpl-bench eval` reads it back."""
    from fpl_bench.saved_prompts import prompts_name, save_prompts

    return save_prompts(
        out / "prompts" / prompts_name(key),
        server=run.server,
        clients=[state.params for state in run.clients],
        config={**config, "eps": key["eps"], "seed": key["seed"]},
        key=key,
        eval_round=run.sched.rounds - 1 if trains else 0,
        version=provenance()["version"],
    )


def backbone_label(spec: ExperimentSpec) -> str:
    """The backbone as results.csv shows it: the model name, with its pretrained tag or the
    checkpoint's file name when one is given ('ViT-B-16:openai')."""
    weights = spec.pretrained or spec.checkpoint
    return spec.backbone if weights is None else f"{spec.backbone}:{Path(weights).name}"


def checkpoint_path(out: Path, key: dict[str, Any]) -> Path:
    """OUT/checkpoints/<hash of the run's key>.pt: one checkpoint per run."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return out / "checkpoints" / f"{digest[:16]}.pt"


def save_checkpoint(path: Path, run: FederatedRun, output: RunOutput, run_id: str) -> None:
    """The run's state after a complete round, written atomically (a kill during the write
    leaves the previous checkpoint)."""
    from fpl_bench.features import save_atomic

    save_atomic(
        {
            "state": run.state_dict(),
            "history": output.history,
            "per_client": output.per_client,
            "rounds_done": output.rounds_done,
            "mlflow_run_id": run_id,
        },
        path,
    )


def load_checkpoint(path: Path, run: FederatedRun, tracker: Any) -> tuple[RunOutput, str | None]:
    """Restore `run` from its checkpoint (weights_only): the output so far and the MLflow run
    to continue (None when the tracking store no longer has it)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        run.load_state_dict(blob["state"])
    except (RuntimeError, KeyError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise UsageError(
            f"checkpoint {path} is damaged ({type(err).__name__}); delete it to restart that run"
        ) from None
    start = RunOutput(blob["history"], run.rounds_schedule, blob["per_client"], blob["rounds_done"])
    run_id = blob["mlflow_run_id"] if tracker.reopen(blob["mlflow_run_id"]) else None
    return start, run_id


def save_partition(fed: Federation, out: Path, dataset: str, seed: int) -> Path:
    path = out / "partitions" / f"{dataset}-{fed.split.n_clients}c-seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fed.split.to_json()))
    return path


def run_experiment(
    spec: ExperimentSpec,
    *,
    log: Callable[[str], None] = print,
    progress: JobProgress | None = None,
) -> pd.DataFrame:
    """Run every method x eps x seed of the spec; returns this job's rows (also merged into
    DIR/results.csv, where a row with the same key replaces the old one)."""
    from fpl_bench.jobs import Job, check_tracking_uri, check_writable_folder, output_lock
    from fpl_bench.tracking import tracking_uri

    build_methods(spec)  # refuse invalid pairs before any data is loaded
    out = Path(spec.out)
    check_writable_folder(out, "output folder")
    check_writable_folder(Path(spec.cache_dir), "cache folder")
    check_tracking_uri(tracking_uri(out))
    csv_path = out / "results.csv"
    if csv_path.exists() and not csv_path.is_file():
        raise UsageError(f"{csv_path} is not a file; move it away or use another --out")
    previous = read_results(csv_path) if csv_path.is_file() else None
    with output_lock(out):
        save_configs(spec, out)
        job = Job(out)
        try:
            rows = _run_cells(spec, out, csv_path, previous, job, log, progress)
        except KeyboardInterrupt:
            job.end("interrupted")
            raise
        except BaseException as err:
            job.fail(err)  # its reason; no record when input was refused before any run
            raise
        job.end("finished")
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))


def _run_cells(
    spec: ExperimentSpec,
    out: Path,
    csv_path: Path,
    previous: pd.DataFrame | None,
    job: Any,
    log: Callable[[str], None],
    progress: JobProgress | None,
) -> list[dict[str, Any]]:
    """Every run of the spec not finished before (--resume): in this process, or spread over
    worker processes when the job is large enough (fpl_bench/parallel.py)."""
    from fpl_bench.tracking import Tracker

    cells = [
        (seed, eps, choice) for seed in spec.seeds for eps in spec.eps for choice in spec.methods
    ]
    # workers may be needed: their imports run while this process prepares
    warm_workers_if_needed(
        workers=spec.workers, device=resolve_device(spec.device).type, runs=len(cells)
    )
    prep = prepare(spec, log)
    for seed in spec.seeds:
        save_partition(federation(prep, seed), out, spec.dataset, seed)
    rows: list[dict[str, Any] | None] = [None] * len(cells)
    pending = []
    for index, (seed, eps, choice) in enumerate(cells):
        done = _finished_row(previous, run_key(spec, choice, eps, seed)) if spec.resume else None
        if done is None:
            pending.append(index)
        else:
            log(f"{_cell_label(cells[index])}: finished in an earlier job; skipped (--resume)")
            rows[index] = done
            if progress:  # the bar's total counts every run of the job
                rounds = _rounds_of(spec, choice)
                progress.start_run(index + 1, len(cells), _cell_label(cells[index]), rounds)
                progress.advance(rounds)
    frozen = [row for row in rows if row is not None]

    def record(index: int, row: dict[str, Any]) -> None:
        rows[index] = row
        job.add_run(row["mlflow_run_id"])
        frame = pd.DataFrame([r for r in rows if r is not None], columns=list(RESULT_COLUMNS))
        write_results(upsert_results(previous, frame), csv_path)

    workers = job_workers(
        requested=spec.workers,
        threads=spec.threads,
        device_type=prep.device.type,
        n_runs=len(pending),
        job_flops=job_training_flops(prep, [cells[i] for i in pending]),
        worker_bytes=prepared_bytes(prep),
    )
    tracker = Tracker(out)  # creates or migrates the tracking store before any worker opens it
    if workers > 1:
        log(f"{len(pending)} runs on {workers} worker processes")
        rounds_of = {i: _rounds_of(spec, cells[i][2]) for i in pending}
        done_rounds = dict.fromkeys(pending, 0)
        if progress:  # one bar segment for all parallel runs, moved by every worker's rounds
            label = f"{len(pending)} runs on {workers} workers"
            progress.start_run(len(frozen) + 1, len(cells), label, sum(rounds_of.values()))

        def on_round(index: int, rounds_done: int) -> None:
            done_rounds[index] = rounds_done
            if progress:
                progress.advance(sum(done_rounds.values()))

        def record_parallel(index: int, row: dict[str, Any]) -> None:
            record(index, row)
            on_round(index, rounds_of[index])

        threads = threads_per_worker(workers, spec.threads)
        order = longest_first(prep, cells, pending)
        del prep  # each worker prepares its own copy (from the warm cache)
        run_parallel(
            spec.model_copy(update={"threads": threads}),
            cells,
            order,
            workers=workers,
            on_row=record_parallel,
            on_round=on_round,
            log=log,
        )
        return [row for row in rows if row is not None]
    _run_in_process(prep, cells, pending, tracker, log, progress, record, n_done=len(frozen))
    return [row for row in rows if row is not None]


def _rounds_of(spec: ExperimentSpec, choice: MethodChoice) -> int:
    """Rounds a run of `choice` trains (0 for a learner with nothing to train): its progress."""
    return spec.rounds if LEARNERS.get(choice.learner).trains else 0


def _cell_label(cell: tuple[int, float | None, MethodChoice]) -> str:
    seed, eps, choice = cell
    return f"{choice.label} eps={'none' if eps is None else eps} seed={seed}"


def _run_in_process(
    prep: Prepared,
    cells: list[tuple[int, float | None, MethodChoice]],
    pending: list[int],
    tracker: Any,
    log: Callable[[str], None],
    progress: JobProgress | None,
    record: Callable[[int, dict[str, Any]], None],
    *,
    n_done: int,
) -> None:
    """The pending runs one after the other in this process."""
    feds: dict[int, Federation] = {}
    for k, index in enumerate(pending):
        seed, eps, choice = cells[index]
        if seed not in feds:
            feds = {seed: federation(prep, seed)}
        if progress:
            rounds = _rounds_of(prep.spec, choice)
            progress.start_run(n_done + k + 1, len(cells), _cell_label(cells[index]), rounds)
        row = run_one(
            prep,
            feds[seed],
            choice,
            eps,
            seed,
            tracker,
            log,
            progress=progress.advance if progress else None,
        )
        record(index, row)


def prepared_bytes(prep: Prepared) -> float:
    """Bytes of a prepared job's tensors (features, tokens, the backbone's weights): about
    what each worker process holds."""
    seen: set[int] = set()
    total = 0.0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for features in (prep.train, prep.test):
        for value in vars(features).values():
            add(value)
    for p in prep.backbone.model.parameters():
        add(p)
    return total


def cell_training_flops(prep: Prepared, cell: tuple[int, float | None, MethodChoice]) -> float:
    """FLOPs of one run's training (`training_flops`) on its seed's partition and tower."""
    seed, eps, choice = cell
    if not LEARNERS.get(choice.learner).trains:
        return 0.0
    protocol, split = prep.partitions[seed]
    return training_flops(
        spec=prep.spec,
        choice=choice,
        eps=eps,
        client_sizes=[len(idx) for idx in split.train],
        pass_flops=prep.tower.pass_flops(len(protocol.seen_classes)),
    )


def training_flops(
    *,
    spec: ExperimentSpec,
    choice: MethodChoice,
    eps: float | None,
    client_sizes: Sequence[int],
    pass_flops: float,
) -> float:
    """FLOPs of one run's training: client steps x tower passes per step x `pass_flops`, the
    FLOPs of one tower pass over the seen classes (`TextTower.pass_flops`). A step's forward is
    one pass per prompt component (FedOTP's global and local prompt, FedPGP's full and sigma
    prompt: 2); its backward one more without DP, and under DP one per sample for each
    component the loss reads (FedPGP's sigma feeds only its prior, whose per-sample cotangents
    are zero and skipped: tower_vjp.tower_backward), plus one per component for a prior
    (KgCoOp, FedProx, FedPGP: its own backward, outside clipping). `client_sizes` are the
    clients' training examples; a suite's dry run estimates them from the dataset card."""
    if not LEARNERS.get(choice.learner).trains:
        return 0.0
    client_steps = sum(
        steps_per_round(n, batch_size=spec.batch_size, local_epochs=spec.local_epochs)
        for n in client_sizes
    )
    scheme = SCHEMES.get(choice.scheme)
    components = scheme.n_prompts + scheme.n_extra_prompts
    if eps is None:
        passes = 2 * components
    else:
        prior = components if build_method(choice).has_prior else 0
        passes = components + scheme.n_prompts * spec.batch_size + prior
    return spec.rounds * spec.client_fraction * client_steps * pass_flops * passes


def job_training_flops(
    prep: Prepared, cells: list[tuple[int, float | None, MethodChoice]]
) -> float:
    """FLOPs of the training in `cells` (`cell_training_flops`); what decides whether workers
    pay (fpl_bench/parallel.py)."""
    return sum(cell_training_flops(prep, cell) for cell in cells)


def longest_first(
    prep: Prepared, cells: list[tuple[int, float | None, MethodChoice]], pending: list[int]
) -> list[int]:
    """`pending` in the order worker processes should take them: most training FLOPs first,
    and among equals a learner that scores patch tokens (FedOTP: a Sinkhorn problem per image,
    class and step on top of the tower) first; so the longest run does not start last and
    leave one worker running alone at the end."""
    return sorted(
        pending,
        key=lambda i: (
            -cell_training_flops(prep, cells[i]),
            not LEARNERS.get(cells[i][2].learner).needs_tokens,
        ),
    )
