"""Data preparation: what every run of an ExperimentSpec shares, made before the first run.

prepare(spec)                   dataset splits, backbone, each seed's client partition, cached
                                image features, the text tower and cross-dataset targets
                                (`Prepared`); whatever can be refused from the labels alone (bad
                                delta or epsilons, a bad ctx_init) is refused before encoding
partition_clients(spec, ...)    the protocol and the seeded, few-shot client partition
federation(prep, seed)          the data of one seed's runs: features, protocol and partition
resolve_device(choice)          the torch device of `--device`
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fpl_bench.backbone import Backbone, load_backbone
from fpl_bench.cards import dataset_card
from fpl_bench.compute import resolve_precision
from fpl_bench.data.partition import ClientSplit, few_shot, make_partitioner
from fpl_bench.data.sources import Splits, load_source
from fpl_bench.driver import FeatureSet, Federation, client_schedule, training_groups
from fpl_bench.errors import UsageError
from fpl_bench.features import image_embeddings, image_features
from fpl_bench.learners import LEARNERS
from fpl_bench.privacy.accountant import use_calibration_cache
from fpl_bench.privacy.planning import (
    check_delta,
    check_epsilons,
    client_budgets,
    plan_for_clients,
)
from fpl_bench.protocols import Protocol, domain_protocol, make_protocol
from fpl_bench.spec import ExperimentSpec
from fpl_bench.text_tower import TextTower
from fpl_bench.vision import VisionTower


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
    vision: VisionTower | None = None  # the image tower, when a learner prompts it


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


def prepare(spec: ExperimentSpec, log: Callable[[str], None] = print) -> Prepared:
    device = resolve_device(spec.device)
    use_calibration_cache(Path(spec.cache_dir) / "noise")
    with_tokens = any(LEARNERS.get(m.learner).needs_tokens for m in spec.methods)
    embedded = any(LEARNERS.get(m.learner).prompts_image_tower for m in spec.methods)
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
                for pooled in poolings(spec):
                    budgets = run_budgets(spec, split, seed, pooled=pooled)
                    check_epsilons(spec.eps, budgets, delta=spec.delta, calibration=spec.accountant)
                    if spec.accountant == "paper":  # a closed form: refused now at no cost
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
    vision = VisionTower.of(backbone.model) if embedded else None  # refuses a non-ViT tower
    # the input is accepted: from here a log shows the job's progress (bad input stays one line)
    log(
        f"{spec.dataset}: {len(splits.train.labels)} training images of "
        f"{len(splits.classnames)} classes, {spec.clients} clients; preparing image features..."
    )
    sets = {
        split: _features(spec, backbone, splits, split, (with_tokens, embedded), device, log)
        for split in ("train", spec.eval_split)
    }
    transfers = [
        _transfer(spec, name, backbone, (with_tokens, embedded), device, log)
        for name in spec.transfer_datasets
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
        vision,
    )


def run_budgets(
    spec: ExperimentSpec, split: ClientSplit, seed: int, *, pooled: bool = False
) -> list[tuple[float, int]]:
    """(q, noisy steps) per trainer of a run of `spec` on `split`: FederatedRun.budget(), one
    trainer per client, or one for everyone's data under a scheme that pools clients."""
    groups = training_groups(split.n_clients, pooled=pooled)
    n_train = [sum(len(split.train[c]) for c in group) for group in groups]
    schedule = client_schedule(
        len(n_train), rounds=spec.rounds, fraction=spec.client_fraction, seed=seed
    )
    return client_budgets(
        n_train, batch_size=spec.batch_size, local_epochs=spec.local_epochs, schedule=schedule
    )


def poolings(spec: ExperimentSpec) -> list[bool]:
    """How the job's training methods group clients for privacy: False, one trainer per
    client; True, one trainer for the pooled data (a scheme that pools clients, central)."""
    from fpl_bench.schemes import SCHEMES

    trained = [m for m in spec.methods if LEARNERS.get(m.learner).trains]
    return sorted({SCHEMES.get(m.scheme).pools_clients for m in trained})


def _features(spec, backbone, splits, split, kinds, device, log) -> FeatureSet:
    """The features of one split; kinds = (patch tokens?, the image tower's input tokens?)."""
    with_tokens, embedded = kinds
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
    inputs = None
    if embedded:
        t0 = time.perf_counter()
        inputs, hit = image_embeddings(
            backbone,
            images,
            data_fingerprint=splits.fingerprint,
            split=split,
            cache_dir=spec.cache_dir,
        )
        log(
            f"image-tower input tokens [{split}] {tuple(inputs.shape)} "
            f"{'from cache' if hit else f'encoded in {time.perf_counter() - t0:.1f}s'}"
        )
    return FeatureSet(
        pooled=pooled.to(device),
        tokens=tokens.to(device) if with_tokens else None,
        labels=torch.as_tensor(np.array(images.labels), dtype=torch.long, device=device),
        embedded=None if inputs is None else inputs.to(device),
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


def _transfer(spec, name, backbone, kinds, device, log) -> Transfer:
    """Load a cross-dataset target: its test split's features and a tower over its classes."""
    splits = load_source(
        dataset_card(name), root=spec.data_root, options={}, cache_dir=spec.cache_dir
    )
    test = _features(spec, backbone, splits, "test", kinds, device, log)
    tower = _text_tower(spec, backbone, splits.classnames, device)
    return Transfer(dataset=name, tower=tower, test=test)


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
        if len(splits.domain_names) < 2:  # every client would hold every class and domain
            raise UsageError(
                f"partition by_domain needs at least 2 domains (this data has "
                f"{len(splits.domain_names)}); use "
                "a domain dataset or synthetic with dataset option domain=all, or another "
                "partition"
            )
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
