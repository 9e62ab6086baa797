"""Success metrics of membership-inference attacks (pure functions, numpy only).

An attack assigns each example a score s_i (higher = more likely a training member) and the
truth is y_i in {0, 1} (1 = member). With P = {i : y_i = 1} (n_pos examples) and
N = {i : y_i = 0} (n_neg examples), the rule "member iff s >= t" has, at threshold t,

    TPR(t) = |{i in P : s_i >= t}| / n_pos,    FPR(t) = |{i in N : s_i >= t}| / n_neg.

ROC curve (`roc_curve_points`). One point per distinct score t_1 > t_2 > ... > t_k, preceded
by (0, 0) at t_0 = +inf (nothing predicted member); the last point is (1, 1). This is
sklearn.metrics.roc_curve with drop_intermediate=False.

AUC (`roc_auc`). The Mann-Whitney statistic over all (member, non-member) pairs, ties counted
as 1/2:

    AUC = (1 / (n_pos n_neg)) sum_{i in P} sum_{j in N} ([s_i > s_j] + [s_i = s_j] / 2),

which equals the trapezoidal area under the ROC curve above. It is computed from mid-ranks:
AUC = (R_P - n_pos (n_pos + 1) / 2) / (n_pos n_neg), R_P the sum of the members' ranks
(1-based, tied scores sharing the mean of their ranks). 0.5 is chance, 1 perfect separation.

TPR at low FPR (`tpr_at_fpr`). Carlini et al., "Membership Inference Attacks From First
Principles" (IEEE S&P 2022), argue that average-case metrics hide whether an attack can
identify *any* member confidently and report the TPR at a fixed low FPR such as 1%. Here it is
max {TPR(t) : FPR(t) <= max_fpr} over the ROC points, without interpolating between points
(the step function of the thresholds actually available). With n_neg < 1 / max_fpr only
FPR = 0 qualifies.

Balanced accuracy (`balanced_accuracy`, `best_threshold_accuracy`). (TPR + TNR) / 2 of hard
predictions, TNR = 1 - FPR: 0.5 for any constant guess whatever the member fraction. The best
balanced accuracy over thresholds, max_t (1 + TPR(t) - FPR(t)) / 2, picks the threshold on the
data it is scored on and is therefore optimistic. The honest variant picks the threshold on
one split (`threshold_from`) and scores hard predictions on a held-out split
(`predict_members`, `held_out_accuracy`).

Loss-threshold attack (`loss_threshold_scores`). Yeom, Giacomelli, Fredrikson, Jha, "Privacy
Risk in Machine Learning: Analyzing the Connection to Overfitting" (IEEE CSF 2018): a model
fits its training examples better, so an example is guessed a member when its loss is low.
The membership score is s_i = -loss_i; thresholding it at minus the average training loss is
the paper's attack, and any of the metrics above can be applied to the scores.

    >>> roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    >>> tpr_at_fpr([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], max_fpr=0.0)
    0.5
    >>> best_threshold_accuracy([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    (0.75, 0.8)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


def _as_scores(name: str, values: ArrayLike) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return arr


def _as_binary(name: str, values: ArrayLike | Sequence[bool]) -> np.ndarray:
    raw = np.asarray(values)
    if raw.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {raw.shape}")
    if raw.dtype == bool:
        return raw
    if not np.issubdtype(raw.dtype, np.number) or not np.all(np.isin(raw, (0, 1))):
        bad = [v for v in np.unique(raw).tolist() if v not in (0, 1)][:5]
        raise ValueError(f"{name} must be binary (0/1 or bool), found values {bad}")
    return raw.astype(bool)


def _checked(
    scores: ArrayLike, is_member: ArrayLike | Sequence[bool], scores_name: str = "scores"
) -> tuple[np.ndarray, np.ndarray]:
    s = _as_scores(scores_name, scores)
    y = _as_binary("is_member", is_member)
    if s.shape != y.shape:
        raise ValueError(
            f"{scores_name} and is_member must have the same length, got {s.size} and {y.size}"
        )
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        kind = "member" if n_pos == 0 else "non-member"
        raise ValueError(
            f"need at least one member and one non-member, got no {kind} among {y.size} examples"
        )
    return s, y


def roc_auc(scores: ArrayLike, is_member: ArrayLike | Sequence[bool]) -> float:
    """Area under the ROC curve: the chance that a random member scores above a random
    non-member, ties counted as 1/2 (Mann-Whitney U / (n_pos n_neg))."""
    s, y = _checked(scores, is_member)
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of the last element of each tie group
    mid_ranks = ends - (counts - 1) / 2.0
    n_pos = int(np.count_nonzero(y))
    n_neg = y.size - n_pos
    rank_sum = float(np.sum(mid_ranks[inverse[y]]))
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def roc_curve_points(
    scores: ArrayLike, is_member: ArrayLike | Sequence[bool]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for "member iff score >= threshold" at every distinct score in
    decreasing order, preceded by (0, 0) at threshold +inf; the last point is (1, 1)."""
    s, y = _checked(scores, is_member)
    distinct, inverse = np.unique(s, return_inverse=True)  # increasing
    pos_per_score = np.bincount(inverse, weights=y, minlength=distinct.size)
    neg_per_score = np.bincount(inverse, weights=~y, minlength=distinct.size)
    # counts of scores >= each distinct score, from the highest score down
    tp = np.concatenate(([0.0], np.cumsum(pos_per_score[::-1])))
    fp = np.concatenate(([0.0], np.cumsum(neg_per_score[::-1])))
    thresholds = np.concatenate(([np.inf], distinct[::-1]))
    return fp / fp[-1], tp / tp[-1], thresholds


def tpr_at_fpr(
    scores: ArrayLike, is_member: ArrayLike | Sequence[bool], max_fpr: float = 0.01
) -> float:
    """Largest TPR over the ROC points with FPR <= max_fpr (Carlini et al. 2022's "TPR at 1%
    FPR" by default). No interpolation between ROC points: only thresholds that exist are
    used, so the value is a step function of max_fpr and never above the interpolated one."""
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr must lie in [0, 1], got {max_fpr}")
    fpr, tpr, _ = roc_curve_points(scores, is_member)
    return float(np.max(tpr[fpr <= max_fpr]))  # (0, 0) always qualifies


def balanced_accuracy(
    predicted: ArrayLike | Sequence[bool], is_member: ArrayLike | Sequence[bool]
) -> float:
    """(TPR + TNR) / 2 of hard member/non-member predictions (binary, 1 = member)."""
    p = _as_binary("predicted", predicted)
    _, y = _checked(p.astype(float), is_member, scores_name="predicted")
    tpr = np.count_nonzero(p & y) / np.count_nonzero(y)
    tnr = np.count_nonzero(~p & ~y) / np.count_nonzero(~y)
    return float((tpr + tnr) / 2.0)


def best_threshold_accuracy(
    scores: ArrayLike, is_member: ArrayLike | Sequence[bool]
) -> tuple[float, float]:
    """(best balanced accuracy, its threshold) over the thresholds of `roc_curve_points`
    ("member iff score >= threshold"); among equally good thresholds the highest is returned.

    The threshold is chosen on the very data it is scored on, so the accuracy is optimistic
    (an attack with no signal still scores above 0.5 on a finite sample). For an honest
    number choose it with `threshold_from` on one split and score another with
    `held_out_accuracy`."""
    fpr, tpr, thresholds = roc_curve_points(scores, is_member)
    accuracy = (1.0 + tpr - fpr) / 2.0
    best = int(np.argmax(accuracy))  # first maximum = highest threshold
    return float(accuracy[best]), float(thresholds[best])


def threshold_from(scores_train: ArrayLike, members_train: ArrayLike | Sequence[bool]) -> float:
    """The threshold of `best_threshold_accuracy` chosen on a training split, to be applied to
    held-out scores with `predict_members`."""
    return best_threshold_accuracy(scores_train, members_train)[1]


def predict_members(scores: ArrayLike, threshold: float) -> np.ndarray:
    """Hard predictions "member iff score >= threshold" (a boolean array)."""
    return _as_scores("scores", scores) >= threshold


def held_out_accuracy(
    scores_train: ArrayLike,
    members_train: ArrayLike | Sequence[bool],
    scores_test: ArrayLike,
    members_test: ArrayLike | Sequence[bool],
) -> float:
    """Balanced accuracy on the test split of the threshold chosen on the train split: the
    honest counterpart of `best_threshold_accuracy`."""
    threshold = threshold_from(scores_train, members_train)
    return balanced_accuracy(predict_members(scores_test, threshold), members_test)


def loss_threshold_scores(losses: ArrayLike) -> np.ndarray:
    """Membership scores of the loss-threshold attack of Yeom et al. (CSF 2018): -loss, since
    training members tend to have lower loss than non-members."""
    return -_as_scores("losses", losses)
