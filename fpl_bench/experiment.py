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
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from fpl_bench.backbone import EMBEDDED, Backbone, load_backbone
from fpl_bench.cards import dataset_card
from fpl_bench.catalog import MethodChoice
from fpl_bench.data.partition import ClientSplit, few_shot, make_partitioner
from fpl_bench.data.sources import Splits, load_source
from fpl_bench.driver import Diverged, FeatureSet, FederatedRun, Federation, NoisePlan, Schedule
from fpl_bench.errors import UsageError
from fpl_bench.evaluate import final_metrics
from fpl_bench.features import image_features
from fpl_bench.learners import LEARNERS
from fpl_bench.method import Method, build_method
from fpl_bench.privacy.accountant import PrivacyLedger
from fpl_bench.privacy.planning import check_delta, plan_for_clients
from fpl_bench.prompt import TextTower
from fpl_bench.protocols import domain_protocol, make_protocol
from fpl_bench.report.records import (
    METRIC_COLUMNS,
    RESULT_COLUMNS,
    read_results,
    upsert_results,
    write_results,
)
from fpl_bench.spec import ExperimentSpec


class JobProgress(Protocol):
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


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda: no CUDA device is visible; use device cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


CPU_THREADS = torch.get_num_threads()


def set_threads(spec: ExperimentSpec, *, private: bool, device: torch.device) -> None:
    """CPU threads for one run. The embedded model's non-private steps are too small for
    intra-op threads to pay off (and OpenMP threads spinning against another busy process slow
    them 20x), so they get one; per-sample (private) steps are B times larger and get all."""
    if device.type != "cpu":
        return
    small = spec.backbone == EMBEDDED and not private
    torch.set_num_threads(spec.threads or (1 if small else CPU_THREADS))


def build_methods(spec: ExperimentSpec) -> list[Method]:
    """Every method of the job, built (pair validity checked) before any data is touched."""
    return [build_method(choice) for choice in spec.methods]


def prepare(spec: ExperimentSpec, log: Callable[[str], None] = print) -> Prepared:
    device = resolve_device(spec.device)
    with_tokens = any(LEARNERS.get(m.learner).needs_tokens for m in spec.methods)
    card = dataset_card(spec.dataset)
    splits = load_source(
        card, root=spec.data_root, options=spec.dataset_options, cache_dir=spec.cache_dir
    )
    backbone = load_backbone(
        spec.backbone, pretrained=spec.pretrained, checkpoint=spec.checkpoint, device=str(device)
    )
    sets = {}
    for split in ("train", spec.eval_split):
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
        sets[split] = FeatureSet(
            pooled=pooled.to(device),
            tokens=tokens.to(device) if with_tokens else None,
            labels=torch.as_tensor(np.array(images.labels), dtype=torch.long, device=device),
        )
    tower = TextTower.build(backbone.model, backbone.tokenizer, splits.classnames, n_ctx=spec.n_ctx)
    return Prepared(spec, splits, backbone, tower, sets["train"], sets[spec.eval_split], device)


def federation(prep: Prepared, seed: int) -> Federation:
    """The protocol and the seeded, few-shot client partition of its seen classes (of the
    train / test images the protocol lets be dealt: cross-domain keeps its target out)."""
    spec, splits = prep.spec, prep.splits
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
    split = few_shot(split, splits.train.labels, shots=spec.shots, seed=seed)
    return Federation(train=prep.train, test=prep.test, split=split, protocol=protocol)


def _pool(pool: np.ndarray | None, n: int) -> np.ndarray:
    return np.arange(n) if pool is None else np.asarray(pool)


def plan_run_privacy(run: FederatedRun, spec: ExperimentSpec, eps: float) -> PrivacyLedger:
    """One sigma for every client of the run (fpl_bench/privacy/planning.py)."""
    check_delta(spec.delta, run.n_train)
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
        mode="json", exclude={"methods", "eps", "seeds", "out", "cache_dir", "threads", "device"}
    )
    cfg.update({"method": choice.label, "learner": choice.learner, "scheme": choice.scheme})
    cfg.update(choice.options())
    return cfg


def config_hash(config: dict[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, default=str)
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
    schedule = Schedule(
        rounds=spec.rounds,
        local_epochs=spec.local_epochs,
        batch_size=spec.batch_size,
        lr=spec.lr,
        momentum=spec.momentum,
        client_fraction=spec.client_fraction,
        eval_every=spec.eval_every,
    )
    torch.manual_seed(seed)
    private = eps is not None and method.trains
    set_threads(spec, private=private, device=prep.device)
    run = FederatedRun(
        method,
        prep.tower,
        fed,
        schedule=schedule,
        seed=seed,
        trust=spec.trust,
        ctx_init=spec.ctx_init,
    )
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
    key = {
        "method": choice.label,
        "learner": choice.learner,
        "scheme": choice.scheme,
        "dataset": spec.dataset,
        "protocol": spec.protocol,
        "trust": spec.trust,
        "eps": "none" if eps is None else eps,
        "seed": seed,
        "config_hash": config_hash(config),
    }
    params = {**config, "eps": key["eps"], "seed": seed, "config_hash": key["config_hash"]}
    if ledger is not None:
        params.update({f"privacy.{k}": v for k, v in asdict(ledger).items()})
    run_name = f"{choice.label}-{spec.dataset}-{spec.trust}-eps{key['eps']}-seed{seed}"
    tags = {k: str(v) for k, v in key.items()}
    run_id = tracker.start(run_name, params, tags)
    t0 = time.perf_counter()
    status = "failed"
    try:
        out = run.run(on_eval=lambda r, m: tracker.log_round(run_id, r, m), progress=progress)
        status = "finished"
    except Diverged as err:
        status = "diverged"
        log(f"{run_name}: diverged ({err}); recorded without accuracy")
    finally:
        if status == "failed":
            tracker.finish(run_id, {}, {}, status="FAILED", tags={"status": "failed"})
    wall = time.perf_counter() - t0
    metrics = dict.fromkeys(METRIC_COLUMNS, math.nan)
    if status == "finished":
        final = final_metrics(
            [{k: v for k, v in h.items() if k not in ("round", "train_loss")} for h in out.history],
            spec.last_k,
        )
        metrics.update({m: final.get(m, math.nan) for m in fed.protocol.metrics})
    privacy = _privacy_columns(spec, eps, ledger)
    artifacts = {"partition.json": fed.split.to_json()}
    if status == "finished":
        artifacts["schedule.json"] = {"sampled_clients": out.schedule}
        artifacts["history.json"] = out.history
    tracker.finish(
        run_id,
        {
            **{f"final/{m}": v for m, v in metrics.items()},
            **{k: v for k, v in privacy.items() if isinstance(v, float | int)},
            "wall_s": wall,
        },
        artifacts,
        status="FINISHED" if status == "finished" else "FAILED",
        tags={"status": status},
    )
    row = {
        **key,
        "status": status,
        **metrics,
        **privacy,
        "rounds": spec.rounds,
        "clients": spec.clients,
        "shots": spec.shots,
        "tuned": False,
        "wall_s": round(wall, 2),
        **provenance(),
        "mlflow_run_id": run_id,
    }
    shown = ", ".join(f"{m}={metrics[m]:.3f}" for m in fed.protocol.metrics)
    spent = f", eps_spent={privacy['eps_spent']:.3f}" if eps is not None else ""
    log(f"{run_name}: {status}, {shown}{spent} ({wall:.1f}s)")
    return row


def save_partition(fed: Federation, out: Path, dataset: str, seed: int) -> Path:
    path = out / "partitions" / f"{dataset}-seed{seed}.json"
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
    from fpl_bench.tracking import Tracker

    build_methods(spec)  # refuse invalid pairs before any data is loaded
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    previous = read_results(csv_path) if csv_path.is_file() else None
    prep = prepare(spec, log)
    tracker = Tracker(out)
    rows: list[dict[str, Any]] = []
    cells = [
        (seed, eps, choice) for seed in spec.seeds for eps in spec.eps for choice in spec.methods
    ]
    feds: dict[int, Federation] = {}
    for index, (seed, eps, choice) in enumerate(cells):
        if seed not in feds:
            feds = {seed: federation(prep, seed)}
            save_partition(feds[seed], out, spec.dataset, seed)
        fed = feds[seed]
        label = f"{choice.label} eps={'none' if eps is None else eps} seed={seed}"
        trains = LEARNERS.get(choice.learner).trains
        if progress:
            progress.start_run(index + 1, len(cells), label, spec.rounds if trains else 0)
        rows.append(
            run_one(
                prep,
                fed,
                choice,
                eps,
                seed,
                tracker,
                log,
                progress=progress.advance if progress else None,
            )
        )
        frame = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
        write_results(upsert_results(previous, frame), csv_path)
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
