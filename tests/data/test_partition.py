"""Tests of the client partitioners, few-shot thinning and the ClientSplit record."""

import json
import time

import numpy as np
import pytest

from fpl_bench.data.partition import (
    IID,
    ByDomain,
    ClientSplit,
    Dirichlet,
    Partitioner,
    Pathological,
    few_shot,
    make_partitioner,
)
from fpl_bench.errors import UsageError


def _all(parts: tuple[np.ndarray, ...]) -> np.ndarray:
    return np.sort(np.concatenate(parts))


def _counts(split: ClientSplit, labels: np.ndarray, n_classes: int, field: str) -> np.ndarray:
    """(client, class) sample counts of the train or test side of a split."""
    return np.stack([np.bincount(labels[ix], minlength=n_classes) for ix in getattr(split, field)])


# -- pathological ---------------------------------------------------------------------------


def test_pathological_classes_are_disjoint_and_cover_the_dealt_classes() -> None:
    train = np.repeat(np.arange(10), 3)
    test = np.tile(np.arange(10), 2)
    split = Pathological(n_clients=3, seed=0).split(train, test, np.arange(10))
    assert _all(split.classes).tolist() == list(range(10))  # each class exactly once


def test_pathological_class_counts_differ_by_at_most_one() -> None:
    train = np.repeat(np.arange(10), 3)
    split = Pathological(n_clients=3, seed=4).split(train, train, np.arange(10))
    assert sorted(len(c) for c in split.classes) == [3, 3, 4]


def test_pathological_train_indices_are_exactly_the_samples_of_the_clients_classes() -> None:
    train = np.array([0, 1, 2, 3, 0, 1, 2, 3])  # class c sits at positions c and c + 4
    split = Pathological(n_clients=2, seed=1).split(train, train, np.arange(4))
    for mine, ix in zip(split.classes, split.train, strict=True):
        a, b = mine.tolist()
        assert ix.tolist() == sorted([a, b, a + 4, b + 4])
        assert ix.dtype == np.int64


def test_pathological_local_test_set_is_every_test_sample_of_the_clients_classes() -> None:
    train = np.array([0, 1, 2, 3])
    test = np.array([3, 3, 2, 1, 0, 9])
    at = {0: [4], 1: [3], 2: [2], 3: [0, 1]}  # test positions of each class, by hand
    split = Pathological(n_clients=2, seed=2).split(train, test, np.arange(4))
    for mine, ix in zip(split.classes, split.test, strict=True):
        assert ix.tolist() == sorted(p for c in mine.tolist() for p in at[c])


def test_pathological_classes_per_client_deals_exactly_that_many() -> None:
    train = np.repeat(np.arange(10), 2)
    split = Pathological(n_clients=3, classes_per_client=2, seed=0).split(
        train, train, np.arange(10)
    )
    assert [len(c) for c in split.classes] == [2, 2, 2]
    assert len(np.unique(_all(split.classes))) == 6
    assert _all(split.train).size == 12  # the 4 undealt classes' samples stay unassigned


def test_pathological_too_many_classes_per_client_is_a_usage_error() -> None:
    train = np.arange(10)
    with pytest.raises(UsageError, match="classes_per_client=4"):
        Pathological(n_clients=3, classes_per_client=4).split(train, train, np.arange(10))


def test_pathological_more_clients_than_classes_is_a_usage_error() -> None:
    train = np.arange(3)
    with pytest.raises(UsageError, match="n_clients=4"):
        Pathological(n_clients=4).split(train, train, np.arange(3))


# -- determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda s: Pathological(n_clients=4, seed=s),
        lambda s: Dirichlet(n_clients=4, alpha=0.5, seed=s),
        lambda s: IID(n_clients=4, seed=s),
    ],
)
def test_same_seed_gives_the_same_split_and_another_seed_differs(make) -> None:  # type: ignore[no-untyped-def]
    train = np.repeat(np.arange(20), 10)
    test = np.repeat(np.arange(20), 5)
    classes = np.arange(20)
    first = make(7).split(train, test, classes)
    assert first == make(7).split(train, test, classes)
    assert first != make(8).split(train, test, classes)


# -- dirichlet --------------------------------------------------------------------------------


def test_dirichlet_respects_min_per_client() -> None:
    train = np.repeat(np.arange(10), 20)
    split = Dirichlet(n_clients=10, alpha=0.5, min_per_client=5, seed=0).split(
        train, train, np.arange(10)
    )
    assert min(len(ix) for ix in split.train) >= 5


def test_dirichlet_assigns_every_sample_of_the_dealt_classes_exactly_once() -> None:
    train = np.repeat(np.arange(6), [5, 9, 13, 2, 30, 7])
    test = np.repeat(np.arange(6), [3, 3, 3, 3, 3, 3])
    split = Dirichlet(n_clients=4, alpha=0.3, min_per_client=1, seed=3).split(
        train, test, np.arange(6)
    )
    assert _all(split.train).tolist() == list(range(train.size))  # disjoint and covering
    assert _all(split.test).tolist() == list(range(test.size))


def test_dirichlet_test_split_uses_the_train_proportions() -> None:
    labels = np.repeat(np.arange(5), 40)  # same pool sizes: same cuts, same counts
    split = Dirichlet(n_clients=3, alpha=0.5, seed=5).split(labels, labels, np.arange(5))
    assert np.array_equal(_counts(split, labels, 5, "train"), _counts(split, labels, 5, "test"))


def test_dirichlet_impossible_min_per_client_fails_fast() -> None:
    train = np.arange(10) % 2  # 10 samples cannot give 50 clients 2 each
    start = time.perf_counter()
    with pytest.raises(UsageError, match="min_per_client"):
        Dirichlet(n_clients=50, alpha=0.5, min_per_client=2).split(train, train, np.arange(2))
    assert time.perf_counter() - start < 1.0


def test_dirichlet_gives_up_after_max_tries_with_advice() -> None:
    train = np.zeros(10, dtype=np.int64)  # one class; alpha 1e-3 hands it all to one client
    start = time.perf_counter()
    with pytest.raises(UsageError, match="raise alpha, lower n_clients or lower min_per_client"):
        Dirichlet(n_clients=5, alpha=1e-3, min_per_client=2, max_tries=20).split(
            train, train, np.array([0])
        )
    assert time.perf_counter() - start < 1.0


def test_large_alpha_gives_near_uniform_class_shares() -> None:
    train = np.repeat(np.arange(10), 1000)
    split = Dirichlet(n_clients=4, alpha=1000.0, seed=0).split(train, train, np.arange(10))
    shares = _counts(split, train, 10, "train") / 1000  # (client, class)
    assert np.abs(shares - 0.25).max() < 0.05


def test_small_alpha_gives_skewed_class_shares() -> None:
    train = np.repeat(np.arange(10), 1000)
    split = Dirichlet(n_clients=4, alpha=0.01, min_per_client=0, seed=0).split(
        train, train, np.arange(10)
    )
    top_share = _counts(split, train, 10, "train").max(axis=0) / 1000  # per class
    assert top_share.mean() > 0.8  # uniform would be 0.25


def test_dirichlet_classes_are_those_present_in_the_train_indices() -> None:
    train = np.repeat(np.arange(8), 10)
    split = Dirichlet(n_clients=3, alpha=0.2, seed=1).split(train, train, np.arange(8))
    for mine, ix in zip(split.classes, split.train, strict=True):
        assert mine.tolist() == sorted(set(train[ix].tolist()))


# -- iid --------------------------------------------------------------------------------------


def test_iid_is_balanced() -> None:
    train = np.arange(103) % 7
    test = np.arange(41) % 7
    split = IID(n_clients=4, seed=0).split(train, test, np.arange(7))
    assert sorted(len(ix) for ix in split.train) == [25, 26, 26, 26]
    assert sorted(len(ix) for ix in split.test) == [10, 10, 10, 11]
    assert _all(split.train).tolist() == list(range(103))


# -- classes outside `classes` ----------------------------------------------------------------


@pytest.mark.parametrize(
    "part",
    [
        Pathological(n_clients=3, seed=0),
        Dirichlet(n_clients=3, alpha=0.5, min_per_client=0, seed=0),
        IID(n_clients=3, seed=0),
    ],
)
def test_samples_of_classes_not_dealt_are_never_assigned(part: Partitioner) -> None:
    train = np.array([0, 7, 1, 2, 8, 3, 4, 5, 7, 0, 1, 2, 3, 4, 5, 8])
    test = np.array([8, 0, 1, 7, 2, 3, 4, 5])
    split = part.split(train, test, np.arange(6))  # 7 and 8 are not dealt
    assert _all(split.train).tolist() == [0, 2, 3, 5, 6, 7, 9, 10, 11, 12, 13, 14]
    assert _all(split.test).tolist() == [1, 2, 4, 5, 6, 7]


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_alpha_is_a_usage_error(alpha: float) -> None:
    with pytest.raises(UsageError, match="alpha"):
        Dirichlet(n_clients=2, alpha=alpha)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Pathological(n_clients=0),
        lambda: Dirichlet(n_clients=0, alpha=1.0),
        lambda: IID(n_clients=0),
    ],
)
def test_zero_clients_is_a_usage_error(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UsageError, match="n_clients=0"):
        make()


@pytest.mark.parametrize(
    ("make", "knob"),
    [
        (lambda: Pathological(n_clients=2, classes_per_client=0), "classes_per_client"),
        (lambda: Dirichlet(n_clients=2, alpha=1.0, min_per_client=-1), "min_per_client"),
        (lambda: Dirichlet(n_clients=2, alpha=1.0, max_tries=0), "max_tries"),
        (lambda: IID(n_clients=2, seed=-1), "seed"),
        (lambda: IID(n_clients=2.5), "n_clients"),  # type: ignore[arg-type]
    ],
)
def test_bad_knob_is_a_usage_error_naming_it(make, knob: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UsageError, match=knob):
        make()


def test_duplicate_or_empty_classes_are_usage_errors() -> None:
    labels = np.array([0, 1, 2])
    with pytest.raises(UsageError, match="duplicates"):
        IID(n_clients=1).split(labels, labels, np.array([0, 0, 1]))
    with pytest.raises(UsageError, match="classes"):
        IID(n_clients=1).split(labels, labels, np.array([], dtype=np.int64))


# -- few-shot ---------------------------------------------------------------------------------


def test_few_shot_caps_each_client_class_at_k() -> None:
    train = np.repeat(np.arange(6), 10)
    test = np.arange(6)
    full = Dirichlet(n_clients=3, alpha=1.0, min_per_client=0, seed=0).split(
        train, test, np.arange(6)
    )
    thin = few_shot(full, train, shots=3, seed=0)
    before = _counts(full, train, 6, "train")
    after = _counts(thin, train, 6, "train")
    assert np.array_equal(after, np.minimum(before, 3))
    for small, big in zip(thin.train, full.train, strict=True):
        assert np.isin(small, big).all()
        assert np.array_equal(small, np.sort(small))
    same = zip(thin.test + thin.classes, full.test + full.classes, strict=True)
    assert all(np.array_equal(a, b) for a, b in same)  # test sets and class lists unchanged


def test_few_shot_is_seeded() -> None:
    train = np.repeat(np.arange(4), 20)
    full = Pathological(n_clients=2, seed=0).split(train, train, np.arange(4))
    a = few_shot(full, train, shots=4, seed=1)
    assert a == few_shot(full, train, shots=4, seed=1)
    assert a != few_shot(full, train, shots=4, seed=2)


def test_few_shot_zero_or_negative_keeps_everything() -> None:
    train = np.repeat(np.arange(4), 5)
    full = Pathological(n_clients=2, seed=0).split(train, train, np.arange(4))
    assert few_shot(full, train, shots=0, seed=0) == full
    assert few_shot(full, train, shots=-1, seed=0) == full


def test_few_shot_more_than_the_pool_holds_is_a_usage_error() -> None:
    train = np.repeat(np.arange(3), 64)
    full = Pathological(n_clients=3, seed=0).split(train, train, np.arange(3))
    assert few_shot(full, train, shots=64, seed=0) == full
    with pytest.raises(UsageError, match=r"--shots 500 exceeds the 64 training images.*<= 64"):
        few_shot(full, train, shots=500, seed=0)


# -- ClientSplit ------------------------------------------------------------------------------


def test_client_split_json_round_trip_is_exact() -> None:
    split = ClientSplit(
        train=(np.array([0, 3, 5]), np.array([], dtype=np.int64)),
        test=(np.array([1]), np.array([2, 4])),
        classes=(np.array([0, 2]), np.array([], dtype=np.int64)),
    )
    d = split.to_json()
    assert d == {"train": [[0, 3, 5], []], "test": [[1], [2, 4]], "classes": [[0, 2], []]}
    back = ClientSplit.from_json(json.loads(json.dumps(d)))
    assert back == split and back.n_clients == 2
    assert all(a.dtype == np.int64 for a in back.train + back.test + back.classes)


def test_client_split_from_malformed_json_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="missing"):
        ClientSplit.from_json({"train": [[0]], "test": [[0]]})
    with pytest.raises(UsageError, match="client split"):
        ClientSplit.from_json({"train": [[0]], "test": [[0]], "classes": []})


def test_client_split_arrays_are_read_only() -> None:
    split = ClientSplit(train=(np.array([1, 2]),), test=(np.array([0]),), classes=(np.array([0]),))
    with pytest.raises(ValueError):
        split.train[0][0] = 5


# -- factory ----------------------------------------------------------------------------------


def test_make_partitioner_builds_each_kind() -> None:
    assert make_partitioner("pathological", n_clients=2, alpha=0.5, seed=1) == Pathological(
        n_clients=2, seed=1
    )
    assert make_partitioner("dirichlet", n_clients=2, alpha=0.5, seed=1) == Dirichlet(
        n_clients=2, alpha=0.5, seed=1
    )
    assert make_partitioner("iid", n_clients=2, alpha=0.5, seed=1) == IID(n_clients=2, seed=1)
    assert isinstance(make_partitioner("iid", n_clients=2, alpha=0.5, seed=1), Partitioner)


def test_make_partitioner_unknown_kind_lists_the_kinds() -> None:
    with pytest.raises(UsageError, match="pathological, dirichlet, iid"):
        make_partitioner("shards", n_clients=2, alpha=0.5, seed=0)  # type: ignore[arg-type]


def test_make_partitioner_rejects_classes_per_client_for_other_kinds() -> None:
    with pytest.raises(UsageError, match="classes_per_client"):
        make_partitioner("dirichlet", n_clients=2, alpha=0.5, seed=0, classes_per_client=2)


# -- by domain --------------------------------------------------------------------------------


def test_by_domain_gives_each_domain_its_clients_only():
    labels = np.tile(np.arange(4), 6)  # 24 samples, 4 classes
    domains = np.repeat(np.arange(3), 8)  # 3 domains of 8 samples
    split = ByDomain(n_domains=3, clients_per_domain=2, seed=0).split(
        labels, labels, np.arange(4), train_domains=domains, test_domains=domains
    )
    assert split.n_clients == 6
    assert _all(split.train).tolist() == list(range(24))  # disjoint and covering
    for client, (train, test) in enumerate(zip(split.train, split.test, strict=True)):
        assert set(domains[train].tolist()) == {client // 2}  # client d*2+j serves domain d
        assert set(domains[test].tolist()) == {client // 2}
        assert len(train) == 4


def test_by_domain_deals_only_the_given_classes_and_is_seeded():
    labels = np.tile(np.arange(4), 4)
    domains = np.repeat(np.arange(2), 8)
    part = ByDomain(n_domains=2, seed=3)
    split = part.split(
        labels, labels, np.array([0, 1]), train_domains=domains, test_domains=domains
    )
    assert set(labels[_all(split.train)].tolist()) == {0, 1}
    assert split == part.split(
        labels, labels, np.array([0, 1]), train_domains=domains, test_domains=domains
    )
    assert split.classes[0].tolist() == [0, 1]


def test_by_domain_needs_domain_ids_in_range():
    labels = np.arange(4)
    with pytest.raises(UsageError, match="needs the per-image domain ids"):
        ByDomain(n_domains=2).split(labels, labels, np.arange(4))
    with pytest.raises(UsageError, match=r"ids outside \[0, 2\)"):
        ByDomain(n_domains=2).split(
            labels, labels, np.arange(4), train_domains=[0, 1, 2, 0], test_domains=[0, 0, 1, 1]
        )
    with pytest.raises(UsageError, match="lower clients_per_domain"):
        ByDomain(n_domains=2, clients_per_domain=3).split(
            labels, labels, np.arange(4), train_domains=[0, 0, 1, 1], test_domains=[0, 0, 1, 1]
        )


def test_make_partitioner_by_domain_splits_clients_over_domains():
    part = make_partitioner("by_domain", n_clients=6, alpha=0.5, seed=1, n_domains=3)
    assert part == ByDomain(n_domains=3, clients_per_domain=2, seed=1)
    assert isinstance(part, Partitioner) and part.n_clients == 6
    with pytest.raises(UsageError, match=r"--clients 5: .*multiple of the 3 domains"):
        make_partitioner("by_domain", n_clients=5, alpha=0.5, seed=1, n_domains=3)
    with pytest.raises(UsageError, match="has no domains"):
        make_partitioner("by_domain", n_clients=5, alpha=0.5, seed=1)
