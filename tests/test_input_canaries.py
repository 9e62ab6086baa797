"""The black-box input-canary audit (fpl_bench/input_canaries.py, audit.input_canary_row)."""

from __future__ import annotations

import numpy as np
import torch

from fpl_bench.data.partition import ClientSplit
from fpl_bench.driver import FeatureSet, Federation
from fpl_bench.input_canaries import canary_rows, draw_canaries, with_canaries
from fpl_bench.protocols import base2novel

CLIENT_CLASSES = (np.array([0, 1, 2]), np.array([3]), np.array([4, 5]))
PROTOCOL = base2novel(np.arange(6), np.arange(6, 12), test_labels=np.arange(30) % 12)


def test_canaries_carry_another_label_of_their_client_and_half_are_in():
    candidates = np.arange(100, 2100)
    true = candidates % 6
    canaries = draw_canaries(candidates, true, CLIENT_CLASSES, m=1500, seed=3)
    assert canaries.m == 1500
    assert len(set(canaries.source.tolist())) == 1500  # without replacement
    assert np.isin(canaries.source, candidates).all()
    # round robin over the clients
    assert np.bincount(canaries.client).tolist() == [500, 500, 500]
    own_true = true[np.searchsorted(candidates, canaries.source)]
    for c, classes in enumerate(CLIENT_CLASSES):
        mine = canaries.client == c
        assert np.isin(canaries.label[mine], classes).all()
        if len(classes) > 1:  # mislabeled wherever the client has another class
            assert (canaries.label[mine] != own_true[mine]).all()
        else:
            assert (canaries.label[mine] == classes[0]).all()
    # S_j ~ Bernoulli(1/2): 1500 draws within 4 standard deviations (sd 19.4) of 750
    assert abs(int(canaries.included.sum()) - 750) < 78
    again = draw_canaries(candidates, true, CLIENT_CLASSES, m=1500, seed=3)
    assert np.array_equal(again.included, canaries.included)
    assert np.array_equal(again.label, canaries.label)
    other = draw_canaries(candidates, true, CLIENT_CLASSES, m=1500, seed=4)
    assert not np.array_equal(other.included, canaries.included)
    # fewer candidates than m: every candidate is a canary
    assert draw_canaries(candidates[:40], true[:40], CLIENT_CLASSES, m=1000, seed=0).m == 40


def test_clients_train_on_their_included_canaries_with_the_canary_labels():
    gen = torch.Generator().manual_seed(0)
    train = FeatureSet(
        pooled=torch.randn(12, 4, generator=gen),
        tokens=torch.randn(12, 3, 4, generator=gen),
        labels=torch.tensor([0, 1, 2, 3, 4, 5] * 2),
    )
    pool = FeatureSet(
        pooled=torch.randn(30, 4, generator=gen),
        tokens=torch.randn(30, 3, 4, generator=gen),
        labels=torch.arange(30) % 6,
    )
    split = ClientSplit(
        train=(np.array([0, 1, 2]), np.array([3, 9]), np.array([4, 5])),
        test=(np.array([0]), np.array([1]), np.array([2])),
        classes=CLIENT_CLASSES,
    )
    fed = Federation(train=train, test=pool, split=split, protocol=PROTOCOL)
    canaries = draw_canaries(np.arange(30), np.arange(30) % 6, CLIENT_CLASSES, m=20, seed=1)
    grown = with_canaries(fed, pool, canaries)
    rows = canary_rows(fed, canaries)
    assert rows.tolist() == list(range(12, 32))
    assert torch.equal(grown.train.pooled[:12], train.pooled)
    assert torch.equal(grown.train.pooled[rows], pool.pooled[canaries.source])
    assert torch.equal(grown.train.tokens[rows], pool.tokens[canaries.source])
    assert grown.train.labels[rows].tolist() == canaries.label.tolist()
    assert grown.train.embedded is None
    for c in range(3):
        mine = rows[(canaries.client == c) & canaries.included]
        expected = sorted([*split.train[c].tolist(), *mine.tolist()])
        assert grown.split.train[c].tolist() == expected
        assert np.array_equal(grown.split.test[c], split.test[c])
        assert np.array_equal(grown.split.classes[c], split.classes[c])
    # the excluded canaries are in no client's data
    out = set(rows[~canaries.included].tolist())
    assert not out & set(np.concatenate(grown.split.train).tolist())


def test_the_black_box_audit_bounds_an_unprotected_run_above_eps_and_a_private_one_below(
    tmp_path,
):
    """A memorizing setting: FedCLIP's adapter, lr 1, 60 rounds, 100 canaries over 64 classes
    (personalized). Without noise the released models give the canaries away (seeded: 38 of 40
    guesses right, eps >= 1.39); the same run at eps = 1 keeps the bound at or below 1."""
    from fpl_bench.audit import input_canary_row
    from fpl_bench.catalog import resolve_method
    from fpl_bench.prepare import prepare
    from fpl_bench.spec import build_spec

    spec = build_spec(
        methods=(resolve_method("fedclip"),),
        protocol="personalized",
        shots=2,
        clients=2,
        rounds=60,
        lr=1.0,
        seeds=(0, 1),
        dataset_options={"n_train_per_class": 8, "n_test_per_class": 2, "n_val_per_class": 2},
        out=tmp_path / "out",
        cache_dir=tmp_path / "cache",
    )
    prep = prepare(spec, lambda _: None)
    choice = spec.methods[0]
    open_run = input_canary_row(prep, choice, None, 0, m=100)
    assert open_run["eps_lower"] > 1.0
    assert open_run["auc"] > 0.75 and open_run["guesses"] >= 20
    assert open_run["n_members"] + open_run["n_nonmembers"] == 100
    for seed in (0, 1):
        private = input_canary_row(prep, choice, 1.0, seed, m=100)
        assert private["eps_lower"] <= 1.0
