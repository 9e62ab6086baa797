"""Membership-inference metrics: hand-computed values on tiny arrays, agreement with
scikit-learn (an independent reference, used only here) on seeded random data, the extreme
cases, and the input checks."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics

from fpl_bench.privacy.attack_metrics import (
    balanced_accuracy,
    best_threshold_accuracy,
    held_out_accuracy,
    loss_threshold_scores,
    predict_members,
    roc_auc,
    roc_curve_points,
    threshold_from,
    tpr_at_fpr,
)

SCORES = [0.1, 0.4, 0.35, 0.8]
MEMBERS = [0, 0, 1, 1]

# --- hand-computed values --------------------------------------------------------------------


def test_auc_by_hand() -> None:
    # pairs (member, non-member): (0.35, 0.1) win, (0.35, 0.4) loss, (0.8, *) two wins -> 3/4
    assert roc_auc(SCORES, MEMBERS) == 0.75
    assert roc_auc(SCORES, [True, True, False, False]) == 0.25


def test_auc_ties_count_half() -> None:
    # members 0.5, 0.7; non-members 0.5, 0.2: pairs 1/2 + 1 + 1 + 1 = 3.5 of 4
    assert roc_auc([0.5, 0.7, 0.5, 0.2], [1, 1, 0, 0]) == 0.875
    assert roc_auc([3.0, 3.0, 3.0], [1, 0, 1]) == 0.5


def test_roc_curve_by_hand() -> None:
    fpr, tpr, thresholds = roc_curve_points(SCORES, MEMBERS)
    np.testing.assert_array_equal(thresholds, [np.inf, 0.8, 0.4, 0.35, 0.1])
    np.testing.assert_array_equal(fpr, [0.0, 0.0, 0.5, 0.5, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 0.5, 0.5, 1.0, 1.0])


def test_roc_curve_ties_share_a_point() -> None:
    fpr, tpr, thresholds = roc_curve_points([0.5, 0.7, 0.5, 0.2], [1, 1, 0, 0])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.7, 0.5, 0.2])
    np.testing.assert_array_equal(fpr, [0.0, 0.0, 0.5, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 0.5, 1.0, 1.0])
    assert np.trapezoid(tpr, fpr) == roc_auc([0.5, 0.7, 0.5, 0.2], [1, 1, 0, 0])


def test_tpr_at_fpr_by_hand_no_interpolation() -> None:
    assert tpr_at_fpr(SCORES, MEMBERS, max_fpr=0.0) == 0.5
    assert tpr_at_fpr(SCORES, MEMBERS, max_fpr=0.49) == 0.5  # interpolation would give ~0.99
    assert tpr_at_fpr(SCORES, MEMBERS, max_fpr=0.5) == 1.0
    assert tpr_at_fpr(SCORES, MEMBERS) == 0.5
    # the top score is a non-member: no threshold has FPR <= 1% with two non-members
    assert tpr_at_fpr([0.9, 0.8, 0.1], [0, 1, 0]) == 0.0


def test_balanced_accuracy_by_hand() -> None:
    # TPR 1/2, TNR 2/3
    assert balanced_accuracy([1, 0, 0, 0, 1], [1, 1, 0, 0, 0]) == pytest.approx(
        7 / 12, rel=0, abs=1e-15
    )
    assert balanced_accuracy([True, True, True], [1, 0, 0]) == 0.5  # constant guess


def test_best_threshold_by_hand() -> None:
    # thresholds 0.8 and 0.35 both give 3/4; the higher one is returned
    assert best_threshold_accuracy(SCORES, MEMBERS) == (0.75, 0.8)
    assert threshold_from(SCORES, MEMBERS) == 0.8
    np.testing.assert_array_equal(predict_members(SCORES, 0.8), [False, False, False, True])


def test_loss_threshold_scores() -> None:
    losses = [0.05, 2.3, 0.2, 1.7]  # members: low training loss
    scores = loss_threshold_scores(losses)
    np.testing.assert_array_equal(scores, [-0.05, -2.3, -0.2, -1.7])
    assert roc_auc(scores, [1, 0, 1, 0]) == 1.0


# --- agreement with scikit-learn -------------------------------------------------------------


def _random_case(seed: int, n: int, rounded: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    members = rng.random(n) < 0.3
    scores = rng.normal(size=n) + 0.7 * members
    if rounded:  # many ties
        scores = np.round(scores, 1)
    members[:2] = [True, False]  # both classes present
    return scores, members


CASES = [(seed, n, rounded) for seed in range(4) for n in (7, 300) for rounded in (False, True)]


@pytest.mark.parametrize(("seed", "n", "rounded"), CASES)
def test_matches_sklearn(seed: int, n: int, rounded: bool) -> None:
    scores, members = _random_case(seed, n, rounded)
    assert abs(roc_auc(scores, members) - metrics.roc_auc_score(members, scores)) < 1e-12

    fpr, tpr, thresholds = roc_curve_points(scores, members)
    ref_fpr, ref_tpr, ref_thr = metrics.roc_curve(members, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(thresholds[1:], ref_thr[1:])
    assert thresholds[0] == np.inf

    for max_fpr in (0.0, 0.01, 0.1, 0.5, 1.0):
        expected = ref_tpr[ref_fpr <= max_fpr].max()
        assert tpr_at_fpr(scores, members, max_fpr) == expected

    threshold = float(np.median(scores))
    predicted = predict_members(scores, threshold)
    expected_bacc = metrics.balanced_accuracy_score(members, predicted)
    assert abs(balanced_accuracy(predicted, members) - expected_bacc) < 1e-12

    best, best_t = best_threshold_accuracy(scores, members)
    brute = np.max((1.0 + ref_tpr - ref_fpr) / 2.0)  # includes (0, 0): accuracy 1/2
    assert abs(best - brute) < 1e-12
    assert abs(metrics.balanced_accuracy_score(members, scores >= best_t) - best) < 1e-12


# --- extremes ----------------------------------------------------------------------------------


def test_perfect_separation() -> None:
    rng = np.random.default_rng(1)
    members = np.repeat([True, False], 500)
    scores = np.where(members, 2.0, 0.0) + rng.random(1000)
    assert roc_auc(scores, members) == 1.0
    assert tpr_at_fpr(scores, members, 0.01) == 1.0
    assert best_threshold_accuracy(scores, members)[0] == 1.0


def test_identical_distributions_near_chance() -> None:
    rng = np.random.default_rng(2)
    scores = rng.normal(size=20_000)
    members = rng.random(20_000) < 0.5
    assert abs(roc_auc(scores, members) - 0.5) < 0.02
    assert tpr_at_fpr(scores, members, 0.01) < 0.03
    # the in-sample best threshold is optimistic; a held-out split is not
    optimistic = best_threshold_accuracy(scores[:200], members[:200])[0]
    honest = held_out_accuracy(scores[:200], members[:200], scores[200:], members[200:])
    assert optimistic > 0.5
    assert abs(honest - 0.5) < 0.02


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metric", [roc_auc, roc_curve_points, tpr_at_fpr, best_threshold_accuracy, balanced_accuracy]
)
def test_empty_class_raises(metric) -> None:
    with pytest.raises(ValueError, match="at least one member and one non-member"):
        metric([1.0, 0.0, 1.0], [1, 1, 1])
    with pytest.raises(ValueError, match="got no member"):
        metric([1.0, 0.0], [0, 0])
    with pytest.raises(ValueError, match="at least one member"):
        metric([], [])


@pytest.mark.parametrize("metric", [roc_auc, roc_curve_points, tpr_at_fpr, balanced_accuracy])
def test_length_mismatch_raises(metric) -> None:
    with pytest.raises(ValueError, match="same length, got 3 and 2"):
        metric([1.0, 0.0, 1.0], [1, 0])


@pytest.mark.parametrize("labels", [[0, 1, 2], [0.0, 0.5, 1.0], [-1, 1, 1], ["a", "b", "a"]])
def test_non_binary_labels_raise(labels) -> None:
    with pytest.raises(ValueError, match="is_member must be binary"):
        roc_auc([0.2, 0.3, 0.4], labels)


def test_other_bad_input_raises() -> None:
    with pytest.raises(ValueError, match="predicted must be binary"):
        balanced_accuracy([0.2, 0.9], [0, 1])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([0.2, np.nan], [0, 1])
    with pytest.raises(ValueError, match="finite"):
        loss_threshold_scores([0.2, np.inf])
    with pytest.raises(ValueError, match="1-D"):
        roc_auc([[0.2, 0.3]], [[0, 1]])
    with pytest.raises(ValueError, match=r"max_fpr must lie in \[0, 1\]"):
        tpr_at_fpr(SCORES, MEMBERS, max_fpr=1.5)
