"""Evaluation protocols as one object, built once per run and handed to the driver and to
evaluation (nothing infers the protocol from which class sets happen to exist).

A `Protocol` says which classes the clients train on (`seen_classes`), which test images are
scored against which class sets (`eval_sets`: logits over that set's classes only), how one
client's correctness becomes its metrics, and which metrics the protocol reports.

personalized (DP-FPL, Tran et al. ICLR 2025): all classes dealt; one eval set "seen" over all
    classes. local = the client's local test images (its own classes); neighbor = the test
    images of classes it does not hold.
base2novel (CoOp / FedPGP): classes split at ceil(n/2) (fpl_bench/data/split.py); only base
    classes are dealt and trained. Eval sets "seen" (base images, logits over base) and
    "novel" (novel images, logits over novel). local / neighbor within the base classes;
    base = every base image; novel = every novel image; hm = 2 B N / (B + N) of the
    client-averaged base and novel accuracies.
multi-domain (FedBN / FedPGP / FLiP's feature-shift setting): every domain's images are
    dealt to that domain's clients (partition by_domain); all classes. local = the client's
    local test share; own_domain = every test image of its domain; other_domain = the test
    images of the other domains.
cross-dataset (CoOp's cross-dataset transfer, IJCV 2022 Table 2): the clients train on the
    source dataset (all classes dealt); each client's prompt is then scored zero-shot on every
    transfer dataset, with logits over that dataset's classes. local = the client's local test
    share; source = every source test image; target = the mean over transfer datasets (after
    the last round) of the accuracy on every test image.
global (FLiP's `global`): all classes dealt; each client's prompt (for a scheme that shares
    it, the server's) scored on the pooled test set of every class, logits over all classes.
    global = accuracy on every test image.
dual (FLiP's `dual`): global as above, local = the client's local test share (FLiP's
    `personal`), hm = 2 L G / (L + G) of the client-averaged local and global accuracies.
cross-domain (leave one domain out, FLiP / PMFLT): the clients train on every domain but the
    target one, whose images are never dealt; all classes. local = the client's local test
    share; source = every test image of the training domains; target = every test image of
    the held-out domain (the generalisation figure).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fpl_bench.data.split import base_novel_split
from fpl_bench.errors import UsageError
from fpl_bench.evaluate import accuracy, harmonic_mean

PROTOCOLS: tuple[str, ...] = (
    "personalized",
    "base2novel",
    "multi-domain",
    "cross-domain",
    "cross-dataset",
    "global",
    "dual",
)


@dataclass(frozen=True)
class EvalSet:
    """Test images scored with logits over `classes` (sorted class ids)."""

    name: str
    classes: np.ndarray  # [n] sorted class ids
    images: np.ndarray  # [M] indices into the test pool


@dataclass(frozen=True)
class Protocol:
    name: str
    seen_classes: np.ndarray  # [n_seen] sorted class ids dealt to clients and trained on
    eval_sets: tuple[EvalSet, ...]
    metrics: tuple[str, ...]
    test_labels: np.ndarray  # [N_test] class ids of the test pool
    test_domains: np.ndarray | None = None  # [N_test] domain ids (domain protocols)
    train_pool: np.ndarray | None = None  # train images that may be dealt (None: all)
    test_pool: np.ndarray | None = None  # test images dealt as local test sets (None: all)
    hm_of: tuple[str, str] = ("base_acc", "novel_acc")  # the two metrics "hm" combines

    def client_metrics(
        self,
        correct: Mapping[str, np.ndarray],
        *,
        local_test: np.ndarray,
        client_classes: np.ndarray,
    ) -> dict[str, float]:
        """One client's metrics from its correctness on each eval set.

        correct[name]: [M] bool per image of eval set `name`; local_test: the client's local
        test indices (into the test pool); client_classes: the classes it holds.
        """
        seen = self.eval_sets[0]
        seen_labels = self.test_labels[seen.images]
        local_pos = np.flatnonzero(np.isin(seen.images, local_test))
        neighbor = np.flatnonzero(~np.isin(seen_labels, client_classes))
        out = {
            "local_acc": accuracy(correct[seen.name], local_pos),
            "neighbor_acc": accuracy(correct[seen.name], neighbor),
        }
        if "base_acc" in self.metrics:
            out["base_acc"] = accuracy(correct[seen.name])
            out["novel_acc"] = accuracy(correct["novel"])
        return out

    def client_domain(self, local_test: np.ndarray) -> int:
        """The domain of a client: the most common domain among its local test images."""
        assert self.test_domains is not None
        return int(np.bincount(self.test_domains[local_test]).argmax())

    def mean_over_clients(self, per_client: Sequence[Mapping[str, float]]) -> dict[str, float]:
        """Unweighted mean over clients of each metric (nan-aware); hm from the means."""
        out: dict[str, float] = {}
        for name in self.metrics:
            if name == "hm":
                continue
            values = np.array([c[name] for c in per_client if name in c], dtype=float)
            finite = values[~np.isnan(values)]
            out[name] = float(finite.mean()) if finite.size else math.nan
        if "hm" in self.metrics:
            out["hm"] = harmonic_mean(out[self.hm_of[0]], out[self.hm_of[1]])
        return out


def make_protocol(name: str, *, n_classes: int, test_labels: np.ndarray) -> Protocol:
    """The protocol `name` for a dataset of `n_classes` whose test pool has `test_labels`."""
    labels = np.asarray(test_labels)
    if name == "personalized":
        classes = np.arange(n_classes)
        return Protocol(
            name=name,
            seen_classes=classes,
            eval_sets=(EvalSet("seen", classes, np.flatnonzero(np.isin(labels, classes))),),
            metrics=("local_acc", "neighbor_acc"),
            test_labels=labels,
        )
    if name == "base2novel":
        return base2novel(*base_novel_split(n_classes), test_labels=labels)
    if name in ("global", "dual"):
        classes = np.arange(n_classes)
        return Pooled(
            name=name,
            seen_classes=classes,
            eval_sets=(EvalSet("seen", classes, np.flatnonzero(np.isin(labels, classes))),),
            metrics=("global_acc",) if name == "global" else ("local_acc", "global_acc", "hm"),
            test_labels=labels,
            hm_of=("local_acc", "global_acc"),
        )
    if name in ("cross-dataset", "transfer"):
        classes = np.arange(n_classes)
        cls = CrossDataset if name == "cross-dataset" else Transfer
        metrics = ("local_acc", "source_acc", "target_acc") if cls is CrossDataset else ()
        return cls(
            name=name,
            seen_classes=classes,
            eval_sets=(EvalSet("seen", classes, np.arange(len(labels))),),
            metrics=metrics + (("target_acc",) if cls is Transfer else ()),
            test_labels=labels,
        )
    raise UsageError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")


def base2novel(base: np.ndarray, novel: np.ndarray, *, test_labels: np.ndarray) -> Protocol:
    """The base-to-novel protocol for given (sorted) base and novel class ids."""
    labels = np.asarray(test_labels)
    base, novel = np.asarray(base), np.asarray(novel)
    return Protocol(
        name="base2novel",
        seen_classes=base,
        eval_sets=(
            EvalSet("seen", base, np.flatnonzero(np.isin(labels, base))),
            EvalSet("novel", novel, np.flatnonzero(np.isin(labels, novel))),
        ),
        metrics=("local_acc", "neighbor_acc", "base_acc", "novel_acc", "hm"),
        test_labels=labels,
    )


@dataclass(frozen=True)
class Pooled(Protocol):
    """global and dual: a client's prompt on the pooled test set of every class (and, dual, on
    its own local test share)."""

    def client_metrics(
        self,
        correct: Mapping[str, np.ndarray],
        *,
        local_test: np.ndarray,
        client_classes: np.ndarray,
    ) -> dict[str, float]:
        seen = self.eval_sets[0]
        out = {"global_acc": accuracy(correct[seen.name])}
        if "local_acc" in self.metrics:
            local = np.flatnonzero(np.isin(seen.images, local_test))
            out["local_acc"] = accuracy(correct[seen.name], local)
        return out


@dataclass(frozen=True)
class MultiDomain(Protocol):
    def client_metrics(
        self,
        correct: Mapping[str, np.ndarray],
        *,
        local_test: np.ndarray,
        client_classes: np.ndarray,
    ) -> dict[str, float]:
        seen = self.eval_sets[0]
        assert self.test_domains is not None
        domains = self.test_domains[seen.images]
        mine = self.client_domain(local_test)
        return {
            "local_acc": accuracy(
                correct[seen.name], np.flatnonzero(np.isin(seen.images, local_test))
            ),
            "own_domain_acc": accuracy(correct[seen.name], np.flatnonzero(domains == mine)),
            "other_domain_acc": accuracy(correct[seen.name], np.flatnonzero(domains != mine)),
        }


@dataclass(frozen=True)
class CrossDomain(Protocol):
    def client_metrics(
        self,
        correct: Mapping[str, np.ndarray],
        *,
        local_test: np.ndarray,
        client_classes: np.ndarray,
    ) -> dict[str, float]:
        source, target = self.eval_sets
        local = np.flatnonzero(np.isin(source.images, local_test))
        return {
            "local_acc": accuracy(correct[source.name], local),
            "source_acc": accuracy(correct[source.name]),
            "target_acc": accuracy(correct[target.name]),
        }


def domain_protocol(
    name: str,
    *,
    n_classes: int,
    test_labels: np.ndarray,
    test_domains: np.ndarray,
    train_domains: np.ndarray,
    domain_names: Sequence[str],
    target_domain: str | None,
) -> Protocol:
    """multi-domain or cross-domain over a dataset whose images carry domain ids."""
    labels, domains = np.asarray(test_labels), np.asarray(test_domains)
    classes = np.arange(n_classes)
    if len(domain_names) < 2:
        raise UsageError(
            f"protocol {name} needs a dataset with at least 2 domains (this one has "
            f"{len(domain_names)}); use a domain dataset or synthetic with "
            "dataset option domain=all"
        )
    if name == "multi-domain":
        if target_domain is not None:
            raise UsageError("target_domain applies to the cross-domain protocol only")
        return MultiDomain(
            name=name,
            seen_classes=classes,
            eval_sets=(EvalSet("seen", classes, np.arange(len(labels))),),
            metrics=("local_acc", "own_domain_acc", "other_domain_acc"),
            test_labels=labels,
            test_domains=domains,
        )
    target_name = target_domain or domain_names[-1]
    if target_name not in domain_names:
        raise UsageError(
            f"target_domain={target_name!r} is not a domain of this dataset; "
            f"its domains: {', '.join(domain_names)}"
        )
    target = domain_names.index(target_name)
    return CrossDomain(
        name=name,
        seen_classes=classes,
        eval_sets=(
            EvalSet("source", classes, np.flatnonzero(domains != target)),
            EvalSet("target", classes, np.flatnonzero(domains == target)),
        ),
        metrics=("local_acc", "source_acc", "target_acc"),
        test_labels=labels,
        test_domains=domains,
        train_pool=np.flatnonzero(np.asarray(train_domains) != target),
        test_pool=np.flatnonzero(domains != target),
    )


@dataclass(frozen=True)
class CrossDataset(Protocol):
    """The source side of cross-dataset transfer; target_acc is added after training."""

    def client_metrics(
        self,
        correct: Mapping[str, np.ndarray],
        *,
        local_test: np.ndarray,
        client_classes: np.ndarray,
    ) -> dict[str, float]:
        seen = self.eval_sets[0]
        local = np.flatnonzero(np.isin(seen.images, local_test))
        return {
            "local_acc": accuracy(correct[seen.name], local),
            "source_acc": accuracy(correct[seen.name]),
        }

    def mean_over_clients(self, per_client: Sequence[Mapping[str, float]]) -> dict[str, float]:
        out = super().mean_over_clients(per_client)
        out.pop("target_acc", None)  # filled in once training is over
        return out


@dataclass(frozen=True)
class Transfer(Protocol):
    """A transfer dataset of cross-dataset: every test image, logits over its classes."""

    def client_metrics(
        self,
        correct: Mapping[str, np.ndarray],
        *,
        local_test: np.ndarray,
        client_classes: np.ndarray,
    ) -> dict[str, float]:
        return {"target_acc": accuracy(correct[self.eval_sets[0].name])}
