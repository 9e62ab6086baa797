"""From an ExperimentSpec to results: data, backbone, features, partitions, runs, records.

prepare(spec)           dataset splits, backbone, cached image features, text tower
federation(prep, seed)  class sets and the seeded client partition (saved with the run)
run_one(...)            one method x eps x seed: privacy plan, federated run, MLflow run
run_experiment(spec)    all of them; results.csv is rewritten after every run, so an
                        interrupted job keeps what it finished
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fpl_bench.backbone import EMBEDDED, Backbone, load_backbone
from fpl_bench.cards import dataset_card, method_cards
from fpl_bench.data.partition import few_shot, make_partitioner
from fpl_bench.data.sources import Splits, load_source
from fpl_bench.data.split import base_novel_split
from fpl_bench.driver import FeatureSet, FederatedRun, Federation, NoisePlan, Schedule
from fpl_bench.errors import UsageError
from fpl_bench.evaluate import PROTOCOL_METRICS, final_metrics
from fpl_bench.features import image_features
from fpl_bench.io import write_atomic
from fpl_bench.methods.registry import build_method, resolve_method_name
from fpl_bench.privacy.accountant import PrivacyLedger, epsilon_spent, plan_privacy
from fpl_bench.prompt import TextTower
from fpl_bench.spec import ExperimentSpec

RESULT_COLUMNS = [
    "method",
    "dataset",
    "protocol",
    "eps",
    "seed",
    "local_acc",
    "neighbor_acc",
    "base_acc",
    "novel_acc",
    "hm",
    "eps_target",
    "eps_spent",
    "delta",
    "noise_multiplier",
    "clip_norm",
    "sample_rate",
    "steps",
    "accountant",
    "rounds",
    "clients",
    "shots",
    "wall_s",
    "mlflow_run_id",
]


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
        raise UsageError("--device cuda: no CUDA device is visible; use --device cpu")
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


def prepare(spec: ExperimentSpec, log: Callable[[str], None] = print) -> Prepared:
    device = resolve_device(spec.device)
    card = dataset_card(spec.dataset)
    splits = load_source(
        card, root=spec.data_root, options=spec.dataset_options, cache_dir=spec.cache_dir
    )
    backbone = load_backbone(
        spec.backbone, pretrained=spec.pretrained, checkpoint=spec.checkpoint, device=str(device)
    )
    sets = {}
    for split in ("train", "test"):
        images = getattr(splits, split)
        t0 = time.perf_counter()
        pooled, tokens, hit = image_features(
            backbone,
            images.images,
            data_fingerprint=splits.fingerprint,
            split=split,
            cache_dir=spec.cache_dir,
        )
        log(
            f"image features [{split}] {tuple(pooled.shape)} "
            f"{'from cache' if hit else f'encoded in {time.perf_counter() - t0:.1f}s'}"
        )
        sets[split] = FeatureSet(
            pooled=pooled.to(device),
            tokens=tokens.to(device),
            labels=torch.as_tensor(images.labels, dtype=torch.long, device=device),
        )
    tower = TextTower.build(backbone.model, backbone.tokenizer, splits.classnames, n_ctx=spec.n_ctx)
    if device.type == "cpu":
        # The embedded model's ops are too small for intra-op threads to pay off, and OpenMP
        # threads spinning against another busy process slow them 20x: one thread by default.
        torch.set_num_threads(
            spec.threads or (1 if spec.backbone == EMBEDDED else torch.get_num_threads())
        )
    return Prepared(spec, splits, backbone, tower, sets["train"], sets["test"], device)


def federation(prep: Prepared, seed: int) -> Federation:
    """Class sets of the protocol and the seeded, few-shot client partition."""
    spec, splits = prep.spec, prep.splits
    n_classes = len(splits.classnames)
    if spec.protocol == "base2novel":
        seen, novel = base_novel_split(n_classes)
    else:
        seen, novel = np.arange(n_classes), None
    partitioner = make_partitioner(
        spec.partition, n_clients=spec.clients, alpha=spec.alpha, seed=seed
    )
    split = partitioner.split(splits.train.labels, splits.test.labels, seen)
    split = few_shot(split, splits.train.labels, shots=spec.shots, seed=seed)
    as_tensor = lambda a: torch.as_tensor(a, dtype=torch.long, device=prep.device)  # noqa: E731
    return Federation(
        train=prep.train,
        test=prep.test,
        split=split,
        seen_classes=as_tensor(seen),
        novel_classes=None if novel is None else as_tensor(novel),
    )


def plan_run_privacy(run: FederatedRun, spec: ExperimentSpec, eps: float) -> PrivacyLedger:
    """One sigma for every client of the run, calibrated for the client whose data is touched
    the most (largest sampling rate x noisy steps), so every client's epsilon <= the target."""
    pairs = sorted({(q, steps) for q, steps in run.budget() if steps > 0})
    ledgers = [
        plan_privacy(
            eps=eps,
            delta=spec.delta,
            clip_norm=spec.clip_norm,
            sample_rate=q,
            steps=steps,
            rounds=spec.rounds,
            calibration=spec.accountant,
        )
        for q, steps in pairs
    ]
    worst = max(ledgers, key=lambda led: led.noise_multiplier)
    reporting = "rdp" if spec.accountant == "paper" else spec.accountant
    spent = [
        epsilon_spent(
            noise_multiplier=worst.noise_multiplier,
            sample_rate=q,
            steps=steps,
            delta=spec.delta,
            accountant=reporting,
        )
        for q, steps in pairs
    ]
    i = int(np.argmax(spent))
    return replace(worst, eps_spent=spent[i], sample_rate=pairs[i][0], steps=pairs[i][1])


def _flat_config(
    spec: ExperimentSpec, method: str, options: dict[str, Any], eps: float | None, seed: int
) -> dict[str, Any]:
    cfg = spec.model_dump(mode="json", exclude={"methods", "method_options", "eps", "seeds"})
    cfg.update({"method": method, "eps": "none" if eps is None else eps, "seed": seed})
    cfg.update({f"method.{k}": v for k, v in options.items()})
    return cfg


def write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False))


def method_options(spec: ExperimentSpec, name: str) -> dict[str, Any]:
    card = method_cards().get(name)
    return {**(card.defaults if card else {}), **spec.method_options.get(name, {})}


def run_one(
    prep: Prepared,
    fed: Federation,
    name: str,
    eps: float | None,
    seed: int,
    tracker: Any,
    log: Callable[[str], None],
    progress: Any = None,
) -> dict[str, Any]:
    spec = prep.spec
    options = method_options(spec, name)
    method = build_method(name, options)
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
    set_threads(spec, private=eps is not None and method.trains, device=prep.device)
    run = FederatedRun(
        method, prep.tower, fed, schedule=schedule, seed=seed, ctx_init=spec.ctx_init
    )
    ledger = None
    if eps is not None and method.trains:
        ledger = plan_run_privacy(run, spec, eps)
        run.enable_privacy(
            NoisePlan(noise_multiplier=ledger.noise_multiplier, clip_norm=spec.clip_norm)
        )
    config = _flat_config(spec, name, options, eps, seed)
    if ledger is not None:
        config.update({f"privacy.{k}": v for k, v in asdict(ledger).items()})
    run_name = f"{name}-{spec.dataset}-eps{'none' if eps is None else eps}-seed{seed}"
    run_id = tracker.start(
        run_name,
        config,
        {
            "method": name,
            "dataset": spec.dataset,
            "eps": str(eps),
            "seed": str(seed),
            "protocol": spec.protocol,
        },
    )
    t0 = time.perf_counter()
    status = "FAILED"
    try:
        out = run.run(on_eval=lambda r, m: tracker.log_round(run_id, r, m), progress=progress)
        status = "FINISHED"
    finally:
        if status == "FAILED":
            tracker.finish(run_id, {}, {}, status="FAILED")
    wall = time.perf_counter() - t0
    final = final_metrics(
        [{k: v for k, v in h.items() if k not in ("round", "train_loss")} for h in out.history],
        spec.last_k,
    )
    privacy = {
        "eps_target": math.nan if eps is None else eps,
        "eps_spent": 0.0
        if (eps is not None and ledger is None)
        else (ledger.eps_spent if ledger else math.nan),
        "delta": spec.delta if eps is not None else math.nan,
        "noise_multiplier": ledger.noise_multiplier if ledger else 0.0,
        "clip_norm": spec.clip_norm if ledger else math.nan,
        "sample_rate": ledger.sample_rate if ledger else math.nan,
        "steps": ledger.steps if ledger else 0,
        "accountant": spec.accountant if ledger else "",
    }
    final_logged = {
        **final,
        **{k: v for k, v in privacy.items() if isinstance(v, float | int)},
        "wall_s": wall,
    }
    tracker.finish(
        run_id,
        final_logged,
        {
            "partition.json": fed.split.to_json(),
            "schedule.json": {"sampled_clients": out.schedule},
            "history.json": out.history,
        },
    )
    row = {
        "method": name,
        "dataset": spec.dataset,
        "protocol": spec.protocol,
        "eps": "none" if eps is None else eps,
        "seed": seed,
        **{m: final.get(m, math.nan) for m in PROTOCOL_METRICS[spec.protocol]},
        **privacy,
        "rounds": spec.rounds,
        "clients": spec.clients,
        "shots": spec.shots,
        "wall_s": round(wall, 2),
        "mlflow_run_id": run_id,
    }
    log(
        f"{run_name}: "
        + ", ".join(f"{m}={final.get(m, math.nan):.3f}" for m in PROTOCOL_METRICS[spec.protocol])
        + (f", eps_spent={privacy['eps_spent']:.3f}" if eps is not None else "")
        + f" ({wall:.1f}s)"
    )
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
    progress_factory: Callable[[str, int], Any] | None = None,
) -> pd.DataFrame:
    """Run every method x eps x seed of the spec; returns the rows also written to results.csv."""
    from fpl_bench.tracking import Tracker

    methods = [resolve_method_name(m) for m in spec.methods]
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    previous = pd.read_csv(csv_path) if csv_path.is_file() else None
    prep = prepare(spec, log)
    tracker = Tracker(out)
    rows: list[dict[str, Any]] = []
    for seed in spec.seeds:
        fed = federation(prep, seed)
        save_partition(fed, out, spec.dataset, seed)
        for eps in spec.eps:
            for name in methods:
                label = f"{name} eps={'none' if eps is None else eps} seed={seed}"
                bar = progress_factory(label, spec.rounds) if progress_factory else None
                try:
                    rows.append(
                        run_one(
                            prep,
                            fed,
                            name,
                            eps,
                            seed,
                            tracker,
                            log,
                            progress=bar.update if bar else None,
                        )
                    )
                finally:
                    if bar:
                        bar.close()
                frame = pd.DataFrame(rows, columns=RESULT_COLUMNS)
                if previous is not None:
                    frame = pd.concat([previous, frame], ignore_index=True)
                write_csv_atomic(frame, csv_path)
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)
