"""Protocol metrics against hand-computed values."""

import math

import numpy as np

from fpl_bench.evaluate import (
    ClientScores,
    client_metrics,
    final_metrics,
    harmonic_mean,
    mean_over_clients,
)


def test_client_metrics_local_neighbor_base_novel():
    # seen test images: labels 0,0,1,1,2,2 ; client holds class 0 -> local = positions 0,1
    seen_labels = np.array([0, 0, 1, 1, 2, 2])
    correct = np.array([True, False, True, True, False, False])
    scores = ClientScores(seen_correct=correct, novel_correct=np.array([True, False, False, False]))
    m = client_metrics(
        scores, seen_labels=seen_labels, local_idx=np.array([0, 1]), client_classes=np.array([0])
    )
    assert m["local_acc"] == 0.5
    assert m["neighbor_acc"] == 0.5  # classes 1, 2: T T F F
    assert m["base_acc"] == 3 / 6
    assert m["novel_acc"] == 0.25


def test_mean_over_clients_is_unweighted_and_hm_from_means():
    clients = [
        {"local_acc": 1.0, "neighbor_acc": 0.0, "base_acc": 0.8, "novel_acc": 0.4},
        {"local_acc": 0.5, "neighbor_acc": math.nan, "base_acc": 0.6, "novel_acc": 0.2},
    ]
    m = mean_over_clients(clients, "base2novel")
    assert m["local_acc"] == 0.75
    assert m["neighbor_acc"] == 0.0  # nan ignored
    assert math.isclose(m["base_acc"], 0.7) and math.isclose(m["novel_acc"], 0.3)
    assert math.isclose(m["hm"], 2 * 0.7 * 0.3 / 1.0)
    assert set(mean_over_clients(clients, "personalized")) == {"local_acc", "neighbor_acc"}


def test_harmonic_mean_and_final_mean_of_last_k():
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert math.isclose(harmonic_mean(0.5, 1.0), 2 / 3)
    history = [{"local_acc": v} for v in (0.1, 0.2, 0.4, 0.6)]
    assert math.isclose(final_metrics(history, 2)["local_acc"], 0.5)
