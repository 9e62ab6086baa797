"""Deal the training classes of a dataset to federated clients.

A partitioner is a small frozen dataclass: every knob (clients, alpha, seed, ...) is a
constructor argument, checked in ``__post_init__`` without data, and checked again against the
labels in ``split``. Each draws from its own ``np.random.default_rng(seed)``, never the global
RNG, so the same seed and inputs give the same split on every machine. One call serves every
scheme::

    part = make_partitioner("dirichlet", n_clients=10, alpha=0.5, seed=1)
    split = part.split(train_labels, test_labels, classes=base)   # -> ClientSplit
    split = few_shot(split, train_labels, shots=16, seed=1)
    json.dump(split.to_json(), f)                                  # saved with the run

``classes`` are the class ids that are dealt (only the base classes in base2novel); samples of
any other class are never assigned. A ``ClientSplit`` holds, per client, sorted int64 indices
into the train pool, indices into the test pool (the client's *local* test set, see docs/design.md
"Evaluation protocols": personalized accuracy) and the class ids present in its train indices.

``ByDomain`` (feature shift, one or more clients per domain) also takes the per-image domain
ids, ``split(..., train_domains=splits.train.domains, test_domains=splits.test.domains)``;
the other partitioners ignore domains.

>>> labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
>>> s = Pathological(n_clients=2, seed=0).split(labels, labels, classes=np.arange(4))
>>> sorted(np.concatenate(s.classes).tolist())
[0, 1, 2, 3]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from fpl_bench.errors import UsageError

__all__ = [
    "IID",
    "KINDS",
    "ByDomain",
    "ClientSplit",
    "Dirichlet",
    "Partitioner",
    "Pathological",
    "few_shot",
    "make_partitioner",
]

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("pathological", "dirichlet", "iid", "by_domain")
_FIELDS = ("train", "test", "classes")


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ClientSplit:
    """Per-client index lists, saved with the run (``to_json``) and reloaded exactly.

    Attributes:
        train: per client, sorted int64 indices into the train pool.
        test: per client, sorted int64 indices into the test pool: the client's local test set.
        classes: per client, sorted class ids present in its train indices.

    The arrays are copies and read-only. Two splits compare equal when every array does.
    """

    train: tuple[np.ndarray, ...]
    test: tuple[np.ndarray, ...]
    classes: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        for name in _FIELDS:
            arrays = tuple(_frozen_index_array(a, name) for a in getattr(self, name))
            object.__setattr__(self, name, arrays)
        sizes = {name: len(getattr(self, name)) for name in _FIELDS}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"ClientSplit fields disagree on the number of clients: {sizes}")

    @property
    def n_clients(self) -> int:
        """Number of clients."""
        return len(self.train)

    def to_json(self) -> dict[str, list[list[int]]]:
        """``{"train": [[int, ...], ...], "test": [...], "classes": [...]}``, one list per client."""
        return {name: [a.tolist() for a in getattr(self, name)] for name in _FIELDS}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ClientSplit:
        """Inverse of ``to_json``; a malformed dict (a hand-edited or foreign file) is a UsageError."""
        if not isinstance(d, dict):
            raise UsageError(
                f"client split={type(d).__name__}: expected a JSON object with keys "
                f"{list(_FIELDS)}; pass a split written by ClientSplit.to_json"
            )
        missing = [name for name in _FIELDS if name not in d]
        if missing:
            raise UsageError(
                f"client split keys={sorted(d)}: missing {missing}; "
                "pass a split written by ClientSplit.to_json"
            )
        try:
            return cls(**{name: tuple(np.asarray(a) for a in d[name]) for name in _FIELDS})
        except (TypeError, ValueError) as e:
            raise UsageError(
                f"client split: {e}; pass a split written by ClientSplit.to_json"
            ) from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClientSplit):
            return NotImplemented
        return all(
            len(mine) == len(theirs)
            and all(np.array_equal(a, b) for a, b in zip(mine, theirs, strict=True))
            for mine, theirs in (
                (self.train, other.train),
                (self.test, other.test),
                (self.classes, other.classes),
            )
        )

    __hash__ = None  # type: ignore[assignment]  # holds arrays: equal splits need not hash alike


def _frozen_index_array(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name}: each client's entry must be a 1-D index list, got {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: indices must be integers, got dtype {arr.dtype}")
    out = np.array(arr, dtype=np.int64, copy=True)
    out.setflags(write=False)
    return out


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise UsageError(f"{name}={value!r}: must be an integer; set {name} >= {minimum}")
    if value < minimum:
        raise UsageError(f"{name}={value}: must be >= {minimum}; set {name} >= {minimum}")


def _labels(name: str, a: Any) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise UsageError(f"{name} shape={arr.shape}: must be a 1-D array of integer class ids")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise UsageError(f"{name} dtype={arr.dtype}: must hold integer class ids")
    return arr.astype(np.int64, copy=False)


def _check_inputs(
    train_labels: Any, test_labels: Any, classes: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    train = _labels("train_labels", train_labels)
    test = _labels("test_labels", test_labels)
    cls = _labels("classes", classes)
    if cls.size == 0:
        raise UsageError("classes=[]: nothing to deal; pass the class ids the clients train on")
    uniq = np.unique(cls)
    if uniq.size != cls.size:
        raise UsageError(f"classes={cls.tolist()}: holds duplicates; pass each class id once")
    return train, test, uniq


def _assemble(
    train_labels: np.ndarray, train: list[np.ndarray], test: list[np.ndarray]
) -> ClientSplit:
    train = [np.sort(t).astype(np.int64) for t in train]
    test = [np.sort(t).astype(np.int64) for t in test]
    classes = [np.unique(train_labels[t]) for t in train]
    return ClientSplit(train=tuple(train), test=tuple(test), classes=tuple(classes))


# --------------------------------------------------------------------------------------------
# Partitioners
# --------------------------------------------------------------------------------------------


@runtime_checkable
class Partitioner(Protocol):
    """What every partitioner offers: its seed, its client count, and ``split``."""

    @property
    def n_clients(self) -> int: ...

    @property
    def seed(self) -> int: ...

    def split(
        self, train_labels: np.ndarray, test_labels: np.ndarray, classes: np.ndarray
    ) -> ClientSplit: ...


@dataclass(frozen=True)
class Pathological:
    """Classes dealt disjointly to clients; each client gets every sample of its classes.

    Reproduces the "pathological non-IID" split of DP-FPL (linhhtran/DP-FPL,
    ``Dassl/dassl/data/datasets/base_dataset.py``, ``generate_federated_dataset``: shuffle the
    class list, give each client a contiguous run of it) and FedOTP. The client's local test set
    is every test sample of its dealt classes.

    Departures from the reference code: the shuffle uses ``seed`` (the reference fixes
    ``random.seed(2023)``), and when ``classes_per_client`` is None the runs differ in length by
    at most 1 (the reference gives ``round(C / n)`` classes to all but the last client, which
    takes the rest: 10 classes over 4 clients gives 2, 2, 2, 4). With ``classes_per_client=k``
    each client gets exactly k classes and the remaining ``C - n k`` classes are not dealt.

    Args:
        n_clients: number of clients, 1 .. number of dealt classes.
        classes_per_client: classes per client, or None to deal all classes.
        seed: seed of the class shuffle.
    """

    n_clients: int
    classes_per_client: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("n_clients", self.n_clients, minimum=1)
        if self.classes_per_client is not None:
            _check_int("classes_per_client", self.classes_per_client, minimum=1)
        _check_int("seed", self.seed, minimum=0)

    def split(
        self, train_labels: np.ndarray, test_labels: np.ndarray, classes: np.ndarray
    ) -> ClientSplit:
        """Deal ``classes`` to the clients; see the class docstring."""
        train, test, cls = _check_inputs(train_labels, test_labels, classes)
        n, c = self.n_clients, cls.size
        if n > c:
            raise UsageError(
                f"n_clients={n}: the pathological split deals {c} classes disjointly, so at "
                f"most {c} clients; lower n_clients or use the dirichlet partition"
            )
        perm = np.random.default_rng(self.seed).permutation(cls)
        if self.classes_per_client is None:
            chunks = np.array_split(perm, n)
        else:
            k = self.classes_per_client
            if n * k > c:
                raise UsageError(
                    f"classes_per_client={k}: {n} clients x {k} classes = {n * k} > the {c} "
                    f"classes dealt; use classes_per_client <= {c // n} or fewer clients"
                )
            chunks = list(perm[: n * k].reshape(n, k))
        owned = [np.sort(chunk) for chunk in chunks]
        return _assemble(
            train,
            [np.flatnonzero(np.isin(train, mine)) for mine in owned],
            [np.flatnonzero(np.isin(test, mine)) for mine in owned],
        )


@dataclass(frozen=True)
class Dirichlet:
    """Label skew: each class's samples split over the clients by Dirichlet(alpha) proportions.

    The split of Hsu, Qi & Brown 2019 ("Measuring the effects of non-identical data distribution
    for federated visual classification", arXiv 1909.06335), as used for the CIFAR-10/100
    experiments of FedOTP and FedPGP and in DP-FPL's ``datasplit.py`` (``noniid-labeldir``):
    for each dealt class, ``p ~ Dir(alpha * ones(n_clients))``, its shuffled train samples are
    cut at ``floor(cumsum(p) * n_class)``, and the *same* ``p`` cuts its test samples, so each
    client's local test set follows its train label distribution. Small alpha gives a few
    classes per client, large alpha near-uniform shares.

    The whole draw is resampled while any client has fewer than ``min_per_client`` train
    samples, at most ``max_tries`` times, then a UsageError says which knob to turn. Departures
    from the reference code: it loops without bound until every client has 10 train *and* test
    samples, and zeroes the share of clients already holding more than N / n samples (a
    balancing step of NIID-Bench, not in Hsu et al.); neither is done here.

    Args:
        n_clients: number of clients, >= 1.
        alpha: Dirichlet concentration, > 0.
        min_per_client: fewest train samples a client may get, >= 0.
        max_tries: draws before giving up, >= 1.
        seed: seed of the draws and shuffles.
    """

    n_clients: int
    alpha: float
    min_per_client: int = 2
    max_tries: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("n_clients", self.n_clients, minimum=1)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float | np.number):
            raise UsageError(f"alpha={self.alpha!r}: must be a number; set alpha > 0 (e.g. 0.5)")
        if not (np.isfinite(self.alpha) and self.alpha > 0):
            raise UsageError(
                f"alpha={self.alpha}: must be finite and > 0; set alpha > 0 (e.g. 0.5)"
            )
        _check_int("min_per_client", self.min_per_client, minimum=0)
        _check_int("max_tries", self.max_tries, minimum=1)
        _check_int("seed", self.seed, minimum=0)

    def split(
        self, train_labels: np.ndarray, test_labels: np.ndarray, classes: np.ndarray
    ) -> ClientSplit:
        """Split every dealt class by its own Dirichlet proportions; see the class docstring."""
        train, test, cls = _check_inputs(train_labels, test_labels, classes)
        n, m = self.n_clients, self.min_per_client
        train_members = [np.flatnonzero(train == c) for c in cls]
        test_members = [np.flatnonzero(test == c) for c in cls]
        train_sizes = np.array([len(ix) for ix in train_members], dtype=np.int64)
        test_sizes = np.array([len(ix) for ix in test_members], dtype=np.int64)
        total = int(train_sizes.sum())
        if n * m > total:
            raise UsageError(
                f"min_per_client={m}: {n} clients x {m} = {n * m} > the {total} train samples "
                "of the dealt classes; lower n_clients or min_per_client"
            )

        rng = np.random.default_rng(self.seed)
        concentration = np.full(n, float(self.alpha))
        for attempt in range(1, self.max_tries + 1):
            p = rng.dirichlet(concentration, size=cls.size)  # (classes, clients)
            train_counts = _cut_counts(p, train_sizes)
            smallest = int(train_counts.sum(axis=0).min())
            if smallest >= m:
                break
            log.info(
                "dirichlet draw %d/%d: a client got %d < min_per_client=%d train samples; "
                "resampling",
                attempt,
                self.max_tries,
                smallest,
                m,
            )
        else:
            raise UsageError(
                f"min_per_client={m}: after max_tries={self.max_tries} Dirichlet(alpha="
                f"{self.alpha}) draws a client still had {smallest} train samples; raise alpha, "
                "lower n_clients or lower min_per_client"
            )
        test_counts = _cut_counts(p, test_sizes)
        train_owner = _deal(rng, train.size, train_members, train_counts)
        test_owner = _deal(rng, test.size, test_members, test_counts)
        return _assemble(
            train,
            [np.flatnonzero(train_owner == i) for i in range(n)],
            [np.flatnonzero(test_owner == i) for i in range(n)],
        )


def _cut_counts(p: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Samples per (class, client) when ``sizes[k]`` samples are cut at floor(cumsum(p[k]) * size).

    The last cut is the class size itself, so rounding never drops a sample.
    """
    cuts = np.floor(np.cumsum(p, axis=1) * sizes[:, None]).astype(np.int64)
    cuts = np.minimum(cuts, sizes[:, None])
    cuts[:, -1] = sizes
    bounds = np.concatenate([np.zeros((len(sizes), 1), dtype=np.int64), cuts], axis=1)
    return np.diff(bounds, axis=1)


def _deal(
    rng: np.random.Generator, pool: int, members: list[np.ndarray], counts: np.ndarray
) -> np.ndarray:
    """Owner client of each pool sample (-1: not dealt): class k's shuffled samples by counts[k]."""
    owner = np.full(pool, -1, dtype=np.int64)
    clients = np.arange(counts.shape[1])
    for k, ix in enumerate(members):
        owner[rng.permutation(ix)] = np.repeat(clients, counts[k])
    return owner


@dataclass(frozen=True)
class IID:
    """Shuffle the samples of the dealt classes and split them evenly (train and test).

    The homogeneous baseline (``homo`` in DP-FPL's ``datasplit.py``): sizes differ by at most 1.

    Args:
        n_clients: number of clients, 1 .. number of train samples.
        seed: seed of the shuffles.
    """

    n_clients: int
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("n_clients", self.n_clients, minimum=1)
        _check_int("seed", self.seed, minimum=0)

    def split(
        self, train_labels: np.ndarray, test_labels: np.ndarray, classes: np.ndarray
    ) -> ClientSplit:
        """Even random split of the dealt classes' samples; see the class docstring."""
        train, test, cls = _check_inputs(train_labels, test_labels, classes)
        pool_train = np.flatnonzero(np.isin(train, cls))
        pool_test = np.flatnonzero(np.isin(test, cls))
        if self.n_clients > pool_train.size:
            raise UsageError(
                f"n_clients={self.n_clients}: only {pool_train.size} train samples to share; "
                f"use n_clients <= {pool_train.size}"
            )
        rng = np.random.default_rng(self.seed)
        return _assemble(
            train,
            np.array_split(rng.permutation(pool_train), self.n_clients),
            np.array_split(rng.permutation(pool_test), self.n_clients),
        )


@dataclass(frozen=True)
class ByDomain:
    """Feature-shift split: each domain's samples go to that domain's clients only.

    The domain split of FedBN (Li et al., ICLR 2021; med-air/FedBN), FedPGP and DP-FPL
    (linhhtran/DP-FPL, ``data_utils.py``: one client per Office-Caltech10 / DomainNet domain):
    client ``d * clients_per_domain + j`` holds the ``j``-th of ``clients_per_domain`` even
    random shares of domain ``d``'s train samples of the dealt classes, and the same share of
    domain ``d``'s test samples as its local test set. With several clients per domain the
    shares are IID within the domain (FedBN splits each domain further the same way).

    ``split`` needs the per-image domain ids (``ImageSet.domains``); without them it is a
    UsageError, since a one-domain dataset has nothing to split by.

    Args:
        n_domains: number of domains (``len(Splits.domain_names)``), >= 1.
        clients_per_domain: clients per domain, >= 1; n_clients = n_domains x this.
        seed: seed of the shuffles.
    """

    n_domains: int
    clients_per_domain: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("n_domains", self.n_domains, minimum=1)
        _check_int("clients_per_domain", self.clients_per_domain, minimum=1)
        _check_int("seed", self.seed, minimum=0)

    @property
    def n_clients(self) -> int:
        """n_domains x clients_per_domain."""
        return self.n_domains * self.clients_per_domain

    def split(
        self,
        train_labels: np.ndarray,
        test_labels: np.ndarray,
        classes: np.ndarray,
        *,
        train_domains: np.ndarray | None = None,
        test_domains: np.ndarray | None = None,
    ) -> ClientSplit:
        """Deal each domain's samples to its clients; see the class docstring."""
        train, test, cls = _check_inputs(train_labels, test_labels, classes)
        if train_domains is None or test_domains is None:
            raise UsageError(
                "partition=by_domain needs the per-image domain ids of the dataset; use a "
                "domain dataset (or several synthetic domains) or another partition"
            )
        doms = {"train": _labels("train_domains", train_domains)}
        doms["test"] = _labels("test_domains", test_domains)
        for name, d, y in (("train", doms["train"], train), ("test", doms["test"], test)):
            if d.size != y.size:
                raise UsageError(f"{name}_domains has {d.size} ids for {y.size} samples")
            if d.size and (d.min() < 0 or d.max() >= self.n_domains):
                raise UsageError(
                    f"{name}_domains hold ids outside [0, {self.n_domains}); set n_domains to "
                    "the dataset's number of domains"
                )
        rng = np.random.default_rng(self.seed)
        k = self.clients_per_domain
        shares: dict[str, list[np.ndarray]] = {"train": [], "test": []}
        for d in range(self.n_domains):
            for name, y in (("train", train), ("test", test)):
                pool = np.flatnonzero((doms[name] == d) & np.isin(y, cls))
                if name == "train" and pool.size < k:
                    raise UsageError(
                        f"domain {d} has {pool.size} train samples of the dealt classes for "
                        f"{k} clients; lower clients_per_domain (--clients) or deal more classes"
                    )
                shares[name].extend(np.array_split(rng.permutation(pool), k))
        return _assemble(train, shares["train"], shares["test"])


# --------------------------------------------------------------------------------------------
# Few-shot sampling and the factory
# --------------------------------------------------------------------------------------------


def few_shot(split: ClientSplit, train_labels: np.ndarray, *, shots: int, seed: int) -> ClientSplit:
    """Keep at most ``shots`` train samples per (client, class), drawn without replacement.

    CoOp's K-shot protocol (``generate_fewshot_dataset``) applied inside each client's share, as
    DP-FPL's ``generate_federated_fewshot_dataset`` does. ``shots <= 0`` keeps everything.
    Test sets and class lists are unchanged. A request no class can meet (``shots`` above the
    largest number of train samples a dealt class has in the pool) is a UsageError.

    Args:
        split: the partition to thin.
        train_labels: labels of the train pool the split indexes.
        shots: samples per (client, class); <= 0 means all.
        seed: seed of the sampling.
    """
    if isinstance(shots, bool) or not isinstance(shots, int | np.integer):
        raise UsageError(f"--shots {shots!r}: must be an integer; use --shots 16, or 0 for all")
    _check_int("seed", seed, minimum=0)
    if shots <= 0:
        return split
    labels = _labels("train_labels", train_labels)
    dealt = np.unique(np.concatenate([*split.classes, np.empty(0, dtype=np.int64)]))
    if dealt.size == 0:
        return split
    ids, counts = np.unique(labels, return_counts=True)
    available = int(counts[np.isin(ids, dealt)].max())
    if shots > available:
        raise UsageError(
            f"--shots {shots} exceeds the {available} training images available per class in "
            f"this dataset; use --shots <= {available}"
        )
    rng = np.random.default_rng(seed)
    kept = []
    for idx in split.train:
        y = labels[idx]
        order = np.lexsort((rng.random(idx.size), y))  # by class, random within a class
        y_sorted = y[order]
        rank = np.arange(idx.size) - np.searchsorted(y_sorted, y_sorted, side="left")
        kept.append(np.sort(idx[order[rank < shots]]))
    return ClientSplit(train=tuple(kept), test=split.test, classes=split.classes)


def make_partitioner(
    kind: Literal["pathological", "dirichlet", "iid", "by_domain"],
    *,
    n_clients: int,
    alpha: float,
    seed: int,
    classes_per_client: int | None = None,
    n_domains: int | None = None,
) -> Partitioner:
    """Build the partitioner named ``kind``; ``alpha`` is used by dirichlet only.

    ``classes_per_client`` applies to pathological only; giving it for another kind is an error.
    ``by_domain`` needs ``n_domains`` (the dataset's domain count) and deals ``n_clients //
    n_domains`` clients to each domain, so ``n_clients`` must be a multiple of it.
    """
    if kind not in KINDS:
        raise UsageError(f"partition={kind!r}: unknown; use one of {', '.join(KINDS)}")
    if classes_per_client is not None and kind != "pathological":
        raise UsageError(
            f"classes_per_client={classes_per_client}: applies to the pathological partition "
            f"only, not {kind}; drop it or use partition=pathological"
        )
    if kind == "pathological":
        return Pathological(n_clients=n_clients, classes_per_client=classes_per_client, seed=seed)
    if kind == "dirichlet":
        return Dirichlet(n_clients=n_clients, alpha=alpha, seed=seed)
    if kind == "by_domain":
        if n_domains is None or n_domains < 1:
            raise UsageError(
                "partition=by_domain: the dataset has no domains; use a domain dataset or "
                "another partition"
            )
        _check_int("n_clients", n_clients, minimum=1)
        if n_clients % n_domains:
            raise UsageError(
                f"--clients {n_clients}: partition=by_domain needs a multiple of the "
                f"{n_domains} domains (e.g. --clients {n_domains})"
            )
        return ByDomain(n_domains=n_domains, clients_per_domain=n_clients // n_domains, seed=seed)
    return IID(n_clients=n_clients, seed=seed)
