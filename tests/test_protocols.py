"""Protocol objects: class sets, eval sets and metrics against hand-computed values."""

import math

import numpy as np
import pytest

from fpl_bench.errors import UsageError
from fpl_bench.evaluate import final_metrics, harmonic_mean
from fpl_bench.protocols import base2novel, make_protocol


def test_base2novel_client_metrics_local_neighbor_base_novel():
    # test pool labels: 0,0,1,1,2,2 (base) and 3,3,4,4 (novel); the client holds class 0
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    protocol = base2novel(np.array([0, 1, 2]), np.array([3, 4]), test_labels=labels)
    assert [s.name for s in protocol.eval_sets] == ["seen", "novel"]
    assert protocol.eval_sets[1].images.tolist() == [6, 7, 8, 9]
    correct = {
        "seen": np.array([True, False, True, True, False, False]),
        "novel": np.array([True, False, False, False]),
    }
    m = protocol.client_metrics(correct, local_test=np.array([0, 1]), client_classes=np.array([0]))
    assert m["local_acc"] == 0.5
    assert m["neighbor_acc"] == 0.5  # classes 1, 2: T T F F
    assert m["base_acc"] == 3 / 6
    assert m["novel_acc"] == 0.25


def test_make_protocol_splits_at_half_and_personalized_scores_all_classes():
    labels = np.repeat(np.arange(5), 2)
    b2n = make_protocol("base2novel", n_classes=5, test_labels=labels)
    assert b2n.seen_classes.tolist() == [0, 1, 2] and b2n.eval_sets[1].classes.tolist() == [3, 4]
    pers = make_protocol("personalized", n_classes=5, test_labels=labels)
    assert pers.seen_classes.tolist() == [0, 1, 2, 3, 4]
    assert pers.metrics == ("local_acc", "neighbor_acc") and len(pers.eval_sets) == 1
    with pytest.raises(UsageError, match="unknown protocol"):
        make_protocol("cross-nothing", n_classes=5, test_labels=labels)


def test_mean_over_clients_is_unweighted_and_hm_from_means():
    clients = [
        {"local_acc": 1.0, "neighbor_acc": 0.0, "base_acc": 0.8, "novel_acc": 0.4},
        {"local_acc": 0.5, "neighbor_acc": math.nan, "base_acc": 0.6, "novel_acc": 0.2},
    ]
    labels = np.repeat(np.arange(4), 2)
    m = make_protocol("base2novel", n_classes=4, test_labels=labels).mean_over_clients(clients)
    assert m["local_acc"] == 0.75
    assert m["neighbor_acc"] == 0.0  # nan ignored
    assert math.isclose(m["base_acc"], 0.7) and math.isclose(m["novel_acc"], 0.3)
    assert math.isclose(m["hm"], 2 * 0.7 * 0.3 / 1.0)
    pers = make_protocol("personalized", n_classes=4, test_labels=labels)
    assert set(pers.mean_over_clients(clients)) == {"local_acc", "neighbor_acc"}


def test_harmonic_mean_and_final_mean_of_last_k():
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert math.isclose(harmonic_mean(0.5, 1.0), 2 / 3)
    history = [{"local_acc": v} for v in (0.1, 0.2, 0.4, 0.6)]
    assert math.isclose(final_metrics(history, 2)["local_acc"], 0.5)


def test_cross_domain_keeps_the_target_out_of_training_and_scores_it_apart():
    from fpl_bench.protocols import domain_protocol

    # test pool: domains 0,0,1,1,2,2 ; train pool: domains 0,1,2,2
    labels = np.array([0, 1, 0, 1, 0, 1])
    p = domain_protocol(
        "cross-domain",
        n_classes=2,
        test_labels=labels,
        test_domains=np.array([0, 0, 1, 1, 2, 2]),
        train_domains=np.array([0, 1, 2, 2]),
        domain_names=("a", "b", "c"),
        target_domain="b",
    )
    assert p.train_pool.tolist() == [0, 2, 3] and p.test_pool.tolist() == [0, 1, 4, 5]
    assert [s.images.tolist() for s in p.eval_sets] == [[0, 1, 4, 5], [2, 3]]
    correct = {"source": np.array([True, True, False, True]), "target": np.array([True, False])}
    m = p.client_metrics(correct, local_test=np.array([0, 1]), client_classes=np.array([0, 1]))
    assert m == {"local_acc": 1.0, "source_acc": 0.75, "target_acc": 0.5}
    with pytest.raises(UsageError, match="not a domain"):
        domain_protocol(
            "cross-domain",
            n_classes=2,
            test_labels=labels,
            test_domains=np.zeros(6, int),
            train_domains=np.zeros(4, int),
            domain_names=("a", "b"),
            target_domain="z",
        )


def test_multi_domain_scores_own_and_other_domains():
    from fpl_bench.protocols import domain_protocol

    p = domain_protocol(
        "multi-domain",
        n_classes=2,
        test_labels=np.array([0, 1, 0, 1]),
        test_domains=np.array([0, 0, 1, 1]),
        train_domains=np.array([0, 1]),
        domain_names=("a", "b"),
        target_domain=None,
    )
    correct = {"seen": np.array([True, True, False, True])}
    m = p.client_metrics(correct, local_test=np.array([1]), client_classes=np.array([0, 1]))
    assert m == {"local_acc": 1.0, "own_domain_acc": 1.0, "other_domain_acc": 0.5}
    with pytest.raises(UsageError, match="at least 2 domains"):
        domain_protocol(
            "multi-domain",
            n_classes=2,
            test_labels=np.array([0, 1]),
            test_domains=np.array([0, 0]),
            train_domains=np.array([0]),
            domain_names=("a",),
            target_domain=None,
        )


def test_global_and_dual_score_the_pooled_test_set_and_dual_adds_local_and_hm():
    """FLiP's global (a client's prompt on every test image, logits over all classes) and dual
    (global, the local share, and their harmonic mean of client means)."""
    labels = np.array([0, 0, 1, 1, 2, 2])
    glob = make_protocol("global", n_classes=3, test_labels=labels)
    dual = make_protocol("dual", n_classes=3, test_labels=labels)
    for p in (glob, dual):
        assert p.seen_classes.tolist() == [0, 1, 2] and len(p.eval_sets) == 1
        assert p.eval_sets[0].images.tolist() == [0, 1, 2, 3, 4, 5]
    assert glob.metrics == ("global_acc",) and dual.metrics == ("local_acc", "global_acc", "hm")
    correct = {"seen": np.array([True, True, False, True, False, False])}
    own = {"local_test": np.array([0, 1]), "client_classes": np.array([0])}
    assert glob.client_metrics(correct, **own) == {"global_acc": 0.5}
    assert dual.client_metrics(correct, **own) == {"global_acc": 0.5, "local_acc": 1.0}
    clients = [{"global_acc": 0.5, "local_acc": 1.0}, {"global_acc": 0.3, "local_acc": 0.6}]
    m = dual.mean_over_clients(clients)
    assert math.isclose(m["global_acc"], 0.4) and math.isclose(m["local_acc"], 0.8)
    assert math.isclose(m["hm"], 2 * 0.8 * 0.4 / 1.2)
    assert set(glob.mean_over_clients(clients)) == {"global_acc"}


def test_every_protocol_has_a_tuning_objective_among_its_metrics():
    from fpl_bench.evaluate import PROTOCOL_METRICS
    from fpl_bench.protocols import PROTOCOLS
    from fpl_bench.tune.study import OBJECTIVE_METRIC

    assert set(OBJECTIVE_METRIC) == set(PROTOCOLS) == set(PROTOCOL_METRICS)
    for protocol, metric in OBJECTIVE_METRIC.items():
        assert metric in PROTOCOL_METRICS[protocol] and metric != "target_acc", protocol
