"""Membership-inference attacks (fpl_bench/privacy/membership.py) on hand-made outputs: perfect
separation gives 1, identical member and non-member distributions give chance within a bound
of a few standard errors, a label-specific signal needs the per-label classifiers, and the
helpers of the audit job (fpl_bench/audit.py) on tiny arrays."""

from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from fpl_bench.audit import nonmember_pool, pick_nonmembers, shadow_seeds
from fpl_bench.privacy.attack_metrics import held_out_accuracy
from fpl_bench.privacy.membership import (
    AttackModel,
    Outputs,
    TooFewQueries,
    calibration_half,
    loss_threshold_attack,
    shadow_model_attack,
)

K = 4  # classes


def outputs(p_true: np.ndarray, labels: np.ndarray, is_member: np.ndarray) -> Outputs:
    """Probability p_true on the true class, the rest spread evenly over the other K - 1."""
    probs = np.repeat(((1 - p_true) / (K - 1))[:, None], K, axis=1)
    probs[np.arange(len(labels)), labels] = p_true
    return Outputs(probs, labels, is_member)


def separated(n: int, seed: int) -> Outputs:
    """n members with p_y in [0.9, 1), n non-members with p_y in [0.2, 0.4): any threshold
    between them is perfect."""
    rng = np.random.default_rng(seed)
    p_true = np.concatenate([rng.uniform(0.9, 1.0, n), rng.uniform(0.2, 0.4, n)])
    labels = rng.integers(0, K, 2 * n)
    return outputs(p_true, labels, np.arange(2 * n) < n)


def identical(n: int, seed: int) -> Outputs:
    """Members and non-members drawn from one distribution: Dirichlet(1) probability vectors."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(K), 2 * n)
    return Outputs(probs, rng.integers(0, K, 2 * n), np.arange(2 * n) < n)


# --- perfect separation: every metric is 1 ---------------------------------------------------


def test_loss_attack_on_separated_losses_is_perfect() -> None:
    result = loss_threshold_attack(separated(50, seed=0), seed=0)
    assert (result.balanced_acc, result.auc, result.tpr_at_1fpr) == (1.0, 1.0, 1.0)
    assert (result.n_members, result.n_nonmembers, result.attack) == (50, 50, "loss")


def test_shadow_attack_on_separated_outputs_is_perfect() -> None:
    result = shadow_model_attack(separated(100, seed=1), separated(50, seed=2), seed=0)
    assert (result.balanced_acc, result.auc, result.tpr_at_1fpr) == (1.0, 1.0, 1.0)
    assert result.attack == "shadow"


# --- no signal: chance within a bound ---------------------------------------------------------
# With n = 1000 a side, the standard error under no signal is about 0.011 for balanced
# accuracy (sqrt(2 x 0.25 / 4n)), 0.013 for AUC (sqrt((2n + 1) / (12 n^2))) and 0.003 for TPR
# at 1% FPR; the bounds are four to five of them.


@pytest.mark.parametrize("seed", [0, 1])
def test_loss_attack_without_signal_is_chance(seed: int) -> None:
    result = loss_threshold_attack(identical(1000, seed), seed=seed)
    assert abs(result.balanced_acc - 0.5) < 0.05
    assert abs(result.auc - 0.5) < 0.06
    assert result.tpr_at_1fpr < 0.03


def test_shadow_attack_without_signal_is_chance() -> None:
    result = shadow_model_attack(identical(1000, 3), identical(1000, 4), seed=0)
    assert abs(result.balanced_acc - 0.5) < 0.05
    assert abs(result.auc - 0.5) < 0.06
    assert result.tpr_at_1fpr < 0.03


# --- the per-label classifiers ----------------------------------------------------------------


def label_specific(n: int, seed: int) -> Outputs:
    """Label 0: members confident (p_0 = h in [0.8, 0.9]), non-members not (l in [0.3, 0.4]);
    label 1 the other way round, with the same values. Pooled over labels, members and
    non-members have the same p_y values; per label the two sides are apart."""
    rng = np.random.default_rng(seed)
    high, low = rng.uniform(0.8, 0.9, n), rng.uniform(0.3, 0.4, n)
    labels = np.repeat([0, 0, 1, 1], n)
    is_member = np.tile(np.repeat([True, False], n), 2)
    return outputs(np.concatenate([high, low, low, high]), labels, is_member)


def test_a_label_specific_signal_is_found_per_label_and_missed_by_the_loss() -> None:
    target = label_specific(100, seed=1)
    assert shadow_model_attack(label_specific(200, seed=0), target, seed=0).balanced_acc == 1.0
    assert loss_threshold_attack(target, seed=0).auc == 0.5  # the same p_y values on each side


def test_a_label_without_shadow_queries_of_both_sides_uses_the_pooled_classifier() -> None:
    shadow = separated(100, seed=0)
    only_label_0 = Outputs(
        shadow.probs, np.where(shadow.is_member, 0, shadow.labels), shadow.is_member
    )
    result = shadow_model_attack(only_label_0, separated(50, seed=1), seed=0)
    assert result.auc > 0.9  # labels 1..3 hold no shadow member: scored by the pooled fit


def test_fitting_classifiers_together_is_fitting_each_alone() -> None:
    rng = np.random.default_rng(0)
    data = [(rng.random((n, K)), rng.random(n) < 0.4) for n in (7, 20)]
    model = AttackModel(epochs=30)
    together = model.fit(data, seeds=[5, 6])
    alone = [model.fit([d], seeds=[s])[0] for d, s in zip(data, [5, 6], strict=True)]
    for pair in zip(together, alone, strict=True):
        for a, b in zip(*pair, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --- pieces -----------------------------------------------------------------------------------


def test_losses_by_hand() -> None:
    out = Outputs(np.array([[0.5, 0.5], [0.25, 0.75], [1.0, 0.0]]), [0, 1, 1], [1, 0, 1])
    np.testing.assert_allclose(out.losses(), [np.log(2), np.log(4 / 3), -np.log(1e-12)])
    assert (out.n_members, out.n_nonmembers) == (2, 1)


def test_calibration_half_takes_half_of_each_side() -> None:
    is_member = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    mask = calibration_half(is_member, seed=0)
    assert (np.count_nonzero(mask & is_member), np.count_nonzero(mask & ~is_member)) == (3, 2)
    np.testing.assert_array_equal(mask, calibration_half(is_member, seed=0))


def test_loss_attack_reports_the_held_out_half() -> None:
    target = identical(60, seed=5)
    half = calibration_half(target.is_member, seed=7)
    scores, members = -target.losses(), target.is_member
    expected = held_out_accuracy(scores[half], members[half], scores[~half], members[~half])
    assert loss_threshold_attack(target, seed=7).balanced_acc == expected


def test_too_few_queries_and_bad_shapes_are_refused() -> None:
    one_each = outputs(np.array([0.9, 0.1]), np.array([0, 1]), np.array([True, False]))
    with pytest.raises(TooFewQueries, match="at least 2 member"):
        loss_threshold_attack(one_each, seed=0)
    with pytest.raises(ValueError, match="labels must be positions"):
        Outputs(np.full((2, 2), 0.5), [0, 2], [True, False])
    with pytest.raises(ValueError, match="probs"):
        Outputs(np.full((2, 2), 0.5), [0], [True, False])


def test_nonmembers_match_the_members_per_class() -> None:
    rng = np.random.default_rng(0)
    candidates = np.arange(100, 110)
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    picked = pick_nonmembers(np.array([0, 0, 1, 1, 1, 3]), candidates, labels, rng)
    np.testing.assert_array_equal(np.bincount(labels[picked - 100], minlength=3), [2, 2, 0])
    assert len(np.unique(picked)) == len(picked)


def test_shadow_seeds_skip_the_audited_ones() -> None:
    assert shadow_seeds((0, 2), 3) == (1, 3, 4)
    assert shadow_seeds((5,), 0) == ()


def test_nonmembers_come_from_undealt_training_examples_else_the_test_split() -> None:
    train_labels, test_labels = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 2, 2])
    prep = NS(
        splits=NS(train=NS(labels=train_labels), test=NS(labels=test_labels)),
        train="train features",
        test="test features",
    )
    protocol = NS(seen_classes=np.array([0, 1]), train_pool=None, test_pool=None)
    few_shot = NS(protocol=protocol, split=NS(train=(np.array([0]), np.array([2]))))
    source, features, idx = nonmember_pool(prep, few_shot)  # type: ignore[arg-type]
    assert (source, features) == ("train", "train features")
    np.testing.assert_array_equal(idx, [1, 3])  # undealt, of seen classes (not 4, 5: class 2)
    every = NS(protocol=protocol, split=NS(train=(np.array([0, 1]), np.array([2, 3]))))
    source, features, idx = nonmember_pool(prep, every)  # type: ignore[arg-type]
    assert (source, features) == ("test", "test features")
    np.testing.assert_array_equal(idx, [0, 1])
