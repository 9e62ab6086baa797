"""Empirical epsilon lower bounds from one training run (pure functions).

Statistical core of Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run"
(NeurIPS 2023, arXiv 2305.08846), cross-checked against google-deepmind/jax_privacy's auditing
module (`_one_run_p_value` / `epsilon_one_run`).

Setting (the paper's names). There are m canaries; each is included in the training data
independently with probability 1/2: S in {-1, +1}^m uniform, S_i = +1 meaning "in". After
training, the auditor looks at the output and emits T in {-1, 0, +1}^m with ||T||_1 <= r: it
guesses "in" (+1) or "out" (-1) for r canaries and abstains (0) on the rest. The number of
correct guesses is W = sum_i max(0, T_i * S_i).

Main theorem (Theorem 3). If the training algorithm is (eps, delta)-DP, then for every v

    P[W >= v]  <=  f(v) + 2 m delta * max_{i in {1, ..., m}} (f(v - i) - f(v)) / i,

    f(v) := P[Binomial(r, q) >= v],   q := e^eps / (e^eps + 1),

i.e. with delta = 0 the number of correct guesses is stochastically dominated by
Binomial(r, q), the accuracy of eps-DP randomized response on each guess. The right-hand side,
capped at 1, is the p-value of observing v correct guesses under the null hypothesis "the
algorithm is (eps, delta)-DP" (`p_value`). For i > v the term (f(v - i) - f(v)) / i equals
(1 - f(v)) / i < (1 - f(v)) / v, so the maximum is attained at some i <= v, and
f(v - i) - f(v) = P[v - i <= Binomial(r, q) <= v - 1] is summed from the binomial pmf (no
difference of two tails), as in the naive reference of jax_privacy's tests.

Epsilon lower bound (`epsilon_lower_bound`). At confidence 1 - alpha, every eps whose p-value is
below alpha is rejected; the reported bound is the eps at which rejection stops, found by
binary search over eps as in the paper and jax_privacy (the p-value grows with eps where it is
below alpha). The search returns the largest eps it checked to be rejected, so it errs low.
With delta = 0 the p-value is a binomial tail in q alone and the bound has a closed form:
eps = log(p / (1 - p)) with p the one-sided Clopper-Pearson lower confidence bound on the
accuracy W / r (`clopper_pearson_lower`); with delta > 0 that value caps the search.

Choosing the guesses (`guesses_from_scores`, `best_epsilon_lower_bound`). Given one score per
canary (higher = more likely "in"), the auditor guesses "in" for the k_plus highest scores and
"out" for the k_minus lowest, abstaining on the rest. Sweeping k and keeping the best bound is
multiple testing: choosing k after looking at the same scores, the best of K tests each run at
level alpha does not hold at level alpha. `best_epsilon_lower_bound` therefore runs each of
the K candidates of a grid fixed before looking at the scores at level alpha / K (Bonferroni),
so its maximum is a valid lower bound at the stated confidence; `bonferroni=False` reproduces
the uncorrected sweep, for comparison only.

    >>> round(epsilon_lower_bound(m=1000, guesses=1000, correct=1000, delta=1e-5), 4)
    5.7823
    >>> round(epsilon_lower_bound(m=1000, guesses=1000, correct=1000, delta=0.0), 4)
    5.8091
    >>> epsilon_lower_bound(m=1000, guesses=100, correct=50, delta=1e-5)
    0.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

# Bisection stops once the bracket is narrower than this (in eps).
EPS_TOLERANCE = 1e-9


def _check_counts(m: int, guesses: int, correct: int) -> None:
    if not 0 <= correct <= guesses <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= m, got {correct=}, {guesses=}, {m=}")


def _check_unit(name: str, value: float, *, open_interval: bool) -> None:
    ok = 0.0 < value < 1.0 if open_interval else 0.0 <= value <= 1.0
    if not ok:
        interval = "(0, 1)" if open_interval else "[0, 1]"
        raise ValueError(f"{name} must lie in {interval}, got {value}")


def randomized_response_accuracy(eps: float) -> float:
    """q = e^eps / (e^eps + 1): the chance that an eps-DP randomized response guess is right."""
    return float(special.expit(eps))


def clopper_pearson_lower(successes: int, trials: int, significance: float) -> float:
    """One-sided Clopper-Pearson lower bound p on a binomial success rate: the p solving
    P[Binomial(trials, p) >= successes] = significance (0 when successes = 0)."""
    _check_counts(trials, trials, successes)
    _check_unit("significance", significance, open_interval=True)
    if successes == 0:
        return 0.0
    return float(stats.beta.ppf(significance, successes, trials - successes + 1))


def clopper_pearson_upper(successes: int, trials: int, significance: float) -> float:
    """One-sided Clopper-Pearson upper bound p on a binomial success rate: the p solving
    P[Binomial(trials, p) <= successes] = significance (1 when successes = trials)."""
    _check_counts(trials, trials, successes)
    _check_unit("significance", significance, open_interval=True)
    if successes == trials:
        return 1.0
    return float(stats.beta.ppf(1.0 - significance, successes + 1, trials - successes))


def p_value(m: int, guesses: int, correct: int, eps: float, delta: float) -> float:
    """Bound of the main theorem on P[W >= correct] for an (eps, delta)-DP algorithm, capped
    at 1: f(v) + 2 m delta max_i (f(v - i) - f(v)) / i with r = guesses, v = correct."""
    _check_counts(m, guesses, correct)
    _check_unit("delta", delta, open_interval=False)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if correct == 0:
        return 1.0
    q = randomized_response_accuracy(eps)
    tail = float(stats.binom.sf(correct - 1, guesses, q))  # f(v)
    if delta == 0.0:
        return min(tail, 1.0)
    # window[i - 1] = P[v - i <= Binomial(r, q) <= v - 1] = f(v - i) - f(v), for i = 1..v
    window = np.cumsum(stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, q))
    slope = float(np.max(window / np.arange(1, correct + 1)))
    return min(tail + 2.0 * m * delta * slope, 1.0)


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def epsilon_lower_bound(
    m: int,
    guesses: int,
    correct: int,
    delta: float,
    confidence: float = 0.95,
    *,
    tol: float = EPS_TOLERANCE,
) -> float:
    """Largest eps such that "the algorithm is (eps, delta)-DP" is still rejected at the given
    confidence after `correct` of `guesses` guesses on `m` canaries were right; 0.0 when even
    eps = 0 is not rejected."""
    _check_counts(m, guesses, correct)
    _check_unit("delta", delta, open_interval=False)
    _check_unit("confidence", confidence, open_interval=True)
    significance = 1.0 - confidence
    accuracy_lb = clopper_pearson_lower(correct, guesses, significance) if guesses else 0.0
    if accuracy_lb <= 0.5:
        return 0.0  # no better than a coin flip even before delta is accounted for
    eps_hi = _logit(accuracy_lb)  # the exact bound for delta = 0, an upper bound otherwise
    if delta == 0.0:
        return eps_hi
    if p_value(m, guesses, correct, 0.0, delta) >= significance:
        return 0.0
    eps_lo = 0.0  # invariant: eps_lo is rejected (p-value < significance)
    while eps_hi - eps_lo > tol:
        eps_mid = 0.5 * (eps_lo + eps_hi)
        if p_value(m, guesses, correct, eps_mid, delta) < significance:
            eps_lo = eps_mid
        else:
            eps_hi = eps_mid
    return eps_lo


def guesses_from_scores(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    k_plus: int,
    k_minus: int,
) -> tuple[int, int]:
    """(guesses, correct) when guessing "in" for the k_plus highest scores and "out" for the
    k_minus lowest, abstaining on the rest. Equal scores are ordered by position (a fixed rule
    that does not look at `included`)."""
    score_arr = np.asarray(scores, dtype=float)
    in_arr = np.asarray(included, dtype=bool)
    if score_arr.ndim != 1 or score_arr.shape != in_arr.shape:
        raise ValueError("scores and included must be 1-D and of the same length")
    m = score_arr.size
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(f"need k_plus, k_minus >= 0 and k_plus + k_minus <= m = {m}")
    order = np.argsort(-score_arr, kind="stable")  # highest score first
    correct_in = int(np.sum(in_arr[order[:k_plus]]))
    correct_out = int(np.sum(~in_arr[order[m - k_minus :]]))
    return k_plus + k_minus, correct_in + correct_out


def default_k_grid(m: int) -> list[tuple[int, int]]:
    """Symmetric (k, k) for k in 1, 2, 5, 10, 20, 50, ... below m / 2, and k = m // 2 (every
    canary guessed when m is even). It depends on m only, so it is fixed before the scores."""
    half = m // 2
    if half < 1:
        raise ValueError(f"the default grid needs m >= 2 canaries, got {m}")
    ks: list[int] = []
    decade = 1
    while decade < half:
        ks.extend(k for k in (decade, 2 * decade, 5 * decade) if k < half)
        decade *= 10
    ks.append(half)
    return [(k, k) for k in ks]


@dataclass(frozen=True)
class AuditResult:
    """The best bound over a grid of (k_plus, k_minus) and where it was attained."""

    epsilon: float
    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    significance: float  # the level each candidate was tested at


def best_epsilon_lower_bound(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    delta: float,
    confidence: float = 0.95,
    k_grid: Sequence[tuple[int, int]] | None = None,
    *,
    bonferroni: bool = True,
) -> AuditResult:
    """Best `epsilon_lower_bound` over the (k_plus, k_minus) of `k_grid` (default:
    `default_k_grid(m)`). With `bonferroni` each of the K candidates is tested at significance
    (1 - confidence) / K, so the maximum holds at `confidence`; without it the maximum of K
    uncorrected tests is returned, which overstates the confidence."""
    m = len(scores)
    grid = list(default_k_grid(m) if k_grid is None else k_grid)
    if not grid:
        raise ValueError("k_grid is empty")
    _check_unit("confidence", confidence, open_interval=True)
    significance = (1.0 - confidence) / (len(grid) if bonferroni else 1)
    best: AuditResult | None = None
    for k_plus, k_minus in grid:
        guesses, correct = guesses_from_scores(scores, included, k_plus, k_minus)
        eps = epsilon_lower_bound(m, guesses, correct, delta, 1.0 - significance)
        if best is None or eps > best.epsilon:
            best = AuditResult(eps, k_plus, k_minus, guesses, correct, significance)
    assert best is not None
    return best
