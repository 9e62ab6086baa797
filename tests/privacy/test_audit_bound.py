"""One-run audit bound (Steinke, Nasr, Jagielski 2023): reference values from jax_privacy's
tests, a second implementation of the main theorem in exact rational arithmetic, monotonicity,
and coverage on randomized response with a known epsilon."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from fpl_bench.privacy.audit_bound import (
    best_epsilon_lower_bound,
    clopper_pearson_lower,
    clopper_pearson_upper,
    default_k_grid,
    epsilon_lower_bound,
    guesses_from_scores,
    p_value,
    randomized_response_accuracy,
)

# --- a second implementation, written from the theorem's statement --------------------------


def _exact_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """f(v) + 2 m delta max_{i=1..m} (f(v - i) - f(v)) / i with f(u) = P[Binomial(r, q) >= u]
    summed term by term with math.comb in exact fractions (q is the float e^eps / (e^eps + 1)
    taken as an exact rational); the maximum runs over all i = 1..m, as the theorem states."""
    if v == 0:
        return 1.0
    e = Fraction(math.exp(eps))
    q = e / (e + 1)
    pmf = [math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(r + 1)]
    tails = [Fraction(0)] * (r + 2)  # tails[u] = f(u) for 0 <= u <= r + 1
    for k in range(r, -1, -1):
        tails[k] = tails[k + 1] + pmf[k]

    def f(u: int) -> Fraction:
        return Fraction(1) if u <= 0 else tails[u]

    slope = max((f(v - i) - f(v)) / i for i in range(1, m + 1))
    return float(min(f(v) + 2 * m * Fraction(delta) * slope, Fraction(1)))


def _exact_epsilon(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """Bisection on _exact_p_value, bracketed by doubling (independent of the module's
    Clopper-Pearson bracket)."""
    alpha = 1.0 - confidence
    if _exact_p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while _exact_p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-8:
        mid = (lo + hi) / 2
        if _exact_p_value(m, r, v, mid, delta) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


# (m, guesses, correct, delta, confidence)
EXACT_CASES = [
    (100, 60, 52, 1e-4, 0.95),
    (40, 40, 40, 1e-3, 0.95),
    (200, 120, 100, 1e-5, 0.95),
    (150, 80, 72, 1e-6, 0.99),
]


@pytest.mark.parametrize(("m", "r", "v", "delta", "confidence"), EXACT_CASES)
def test_epsilon_matches_exact_rational_implementation(m, r, v, delta, confidence) -> None:
    expected = _exact_epsilon(m, r, v, delta, confidence)
    assert expected > 0.5  # the cases are informative, not the trivial 0
    assert epsilon_lower_bound(m, r, v, delta, confidence) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("m", "r", "v", "delta", "confidence"), EXACT_CASES)
def test_p_value_matches_exact_rational_implementation(m, r, v, delta, confidence) -> None:
    for eps in (0.0, 0.7, 1.9, 3.3):
        exact = _exact_p_value(m, r, v, eps, delta)
        assert p_value(m, r, v, eps, delta) == pytest.approx(exact, rel=1e-9, abs=1e-15)


# --- reference values from google-deepmind/jax_privacy --------------------------------------
#
# jax_privacy/auditing_test.py, test_epsilon_one_run_close: 10_000 held-in canaries with scores
# N(shift, 1) and 10_000 held-out with N(0, 1), both "deterministic normals" (the normal
# quantiles at (j + 1/2) / n); CanaryScoreAuditor.epsilon_one_run(significance=0.05,
# delta=1e-6) is expected to give 1.13346 (shift 1), 2.311945 (shift 2), 4.395568 (shift 4).
# jax_privacy/auditing.py guesses "in" above a threshold (k_minus = 0), m = 20_000, considers
# the H thresholds on the convex hull of the (false negative, true negative) counts and tests
# each at 0.05 / H (Bonferroni). _jax_one_run_search redoes that search with this module's
# epsilon_lower_bound; the hull size and the winning threshold's counts are pinned too.

JAX_CASES = [
    # shift, expected eps as printed in jax_privacy, its decimals, H, (guesses, correct)
    (1.0, 1.13346, 5, 386, (3376, 2807)),
    (2.0, 2.311945, 6, 374, (4666, 4499)),
    (4.0, 4.395568, 6, 140, (8233, 8223)),
]


def _deterministic_normal(mu: float, n: int) -> np.ndarray:
    return stats.norm.ppf(np.arange(n) / n + 1 / (2 * n)) + mu


def _roc_hull(in_scores: np.ndarray, out_scores: np.ndarray) -> list[tuple[int, int]]:
    """Vertices of the upper convex hull of (#in below t, #out below t) over the thresholds t
    (every score, and +inf), collinear points dropped."""
    thresholds = np.append(np.union1d(in_scores, out_scores), np.inf)
    fn = np.searchsorted(np.sort(in_scores), thresholds, side="left")
    tn = np.searchsorted(np.sort(out_scores), thresholds, side="left")
    hull: list[tuple[int, int]] = []
    for point in zip(fn.tolist(), tn.tolist(), strict=True):
        while len(hull) >= 2:
            (ax, ay), (bx, by) = hull[-2], hull[-1]
            if (bx - ax) * (point[1] - ay) - (by - ay) * (point[0] - ax) < 0:
                break
            hull.pop()
        hull.append(point)
    return hull


def _jax_one_run_search(shift: float, delta: float, significance: float):
    n = 10_000
    hull = _roc_hull(_deterministic_normal(shift, n), _deterministic_normal(0.0, n))
    per_test = significance / len(hull)
    counts = [(2 * n - fn - tn, n - fn) for fn, tn in hull]  # (guesses, correct) above t
    counts = sorted((c for c in counts if c[0] > 0), key=lambda c: -c[1] / c[0])
    best_eps, best_counts = 0.0, None
    for guesses, correct in counts:
        if correct / guesses <= randomized_response_accuracy(best_eps):
            continue  # raw accuracy already below the best bound's q: cannot beat it
        if p_value(2 * n, guesses, correct, best_eps, delta) >= per_test:
            continue  # not even the current best eps is rejected here
        eps = epsilon_lower_bound(2 * n, guesses, correct, delta, 1.0 - per_test)
        if eps > best_eps:
            best_eps, best_counts = eps, (guesses, correct)
    return best_eps, len(hull), best_counts


@pytest.mark.parametrize(("shift", "expected", "decimals", "n_hull", "counts"), JAX_CASES)
def test_reproduces_jax_privacy_epsilon_one_run(shift, expected, decimals, n_hull, counts):
    eps, hull_size, best_counts = _jax_one_run_search(shift, delta=1e-6, significance=0.05)
    assert (hull_size, best_counts) == (n_hull, counts)
    # matched to the printed precision (1.13346 has 5 decimals: to 5e-6; the others to 1e-6)
    assert round(eps, decimals) == expected
    assert abs(eps - expected) <= max(1e-6, 0.5 * 10.0**-decimals)
    # and directly from the counts, as (m, guesses, correct, delta, confidence)
    direct = epsilon_lower_bound(20_000, *counts, delta=1e-6, confidence=1 - 0.05 / n_hull)
    assert direct == eps


# --- Clopper-Pearson and the delta = 0 closed form ------------------------------------------


def test_clopper_pearson_bounds_solve_their_tail_equations() -> None:
    for k, n, sig in [(3, 10, 0.05), (70, 100, 0.01), (999, 1000, 0.05)]:
        lo, hi = clopper_pearson_lower(k, n, sig), clopper_pearson_upper(k, n, sig)
        assert lo < k / n < hi
        assert stats.binom.sf(k - 1, n, lo) == pytest.approx(sig, rel=1e-8)
        assert stats.binom.cdf(k, n, hi) == pytest.approx(sig, rel=1e-8)
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0
    assert clopper_pearson_upper(10, 10, 0.05) == 1.0
    assert clopper_pearson_lower(10, 10, 0.05) == pytest.approx(0.05 ** (1 / 10))


def test_delta_zero_is_the_logit_of_the_clopper_pearson_bound() -> None:
    m, r, v = 1000, 400, 330
    eps = epsilon_lower_bound(m, r, v, delta=0.0)
    p_lb = clopper_pearson_lower(v, r, 0.05)
    assert eps == pytest.approx(math.log(p_lb / (1 - p_lb)), rel=1e-12)
    assert p_value(m, r, v, eps, 0.0) == pytest.approx(0.05, rel=1e-6)
    # the bisection with a vanishing delta lands on the same value
    assert epsilon_lower_bound(m, r, v, delta=1e-300) == pytest.approx(eps, abs=1e-8)
    # all correct: q_lb = alpha^(1/r), so eps = log(q_lb / (1 - q_lb))
    q = 0.05 ** (1 / 1000)
    assert epsilon_lower_bound(1000, 1000, 1000, 0.0) == pytest.approx(math.log(q / (1 - q)))


# --- monotonicity and limits ----------------------------------------------------------------


def test_more_correct_guesses_give_a_larger_bound() -> None:
    bounds = [epsilon_lower_bound(1000, 500, v, 1e-5) for v in range(260, 501, 20)]
    positive = [b for b in bounds if b > 0]
    assert len(positive) >= len(bounds) - 2
    assert all(a < b for a, b in itertools.pairwise(positive))
    assert bounds == sorted(bounds)


def test_all_correct_with_many_guesses_gives_a_large_bound() -> None:
    assert epsilon_lower_bound(1000, 1000, 1000, 1e-5) > 5.5
    assert epsilon_lower_bound(10_000, 10_000, 10_000, 1e-6) > 7.5
    # more perfect guesses, more evidence
    perfect = [epsilon_lower_bound(10_000, r, r, 1e-6) for r in (10, 100, 1000, 10_000)]
    assert perfect == sorted(perfect) and perfect[0] < perfect[-1]


def test_chance_level_gives_zero() -> None:
    for m, r, v in [(1000, 1000, 500), (1000, 100, 50), (1000, 100, 40), (10, 0, 0), (10, 5, 0)]:
        assert epsilon_lower_bound(m, r, v, 1e-5) == 0.0
        assert epsilon_lower_bound(m, r, v, 0.0) == 0.0
    assert p_value(1000, 100, 0, 1.0, 1e-5) == 1.0


def test_delta_and_m_only_weaken_the_bound() -> None:
    m, r, v = 1000, 300, 270
    by_delta = [epsilon_lower_bound(m, r, v, d) for d in (0.0, 1e-8, 1e-6, 1e-5, 1e-4)]
    assert by_delta == sorted(by_delta, reverse=True) and by_delta[0] > by_delta[-1] > 0
    # delta enters as 2 m delta: more canaries (same guesses) cost more
    assert epsilon_lower_bound(10_000, r, v, 1e-5) < epsilon_lower_bound(1000, r, v, 1e-5)
    # higher confidence, smaller bound
    assert epsilon_lower_bound(m, r, v, 1e-5, 0.99) < epsilon_lower_bound(m, r, v, 1e-5, 0.95)


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="correct <= guesses <= m"):
        epsilon_lower_bound(10, 20, 5, 1e-5)
    with pytest.raises(ValueError, match="correct <= guesses <= m"):
        p_value(10, 5, 6, 1.0, 1e-5)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(10, 5, 5, 1e-5, confidence=1.0)
    with pytest.raises(ValueError, match="delta"):
        epsilon_lower_bound(10, 5, 5, delta=1.5)
    with pytest.raises(ValueError, match="eps"):
        p_value(10, 5, 5, -1.0, 0.0)


# --- from scores to guesses -----------------------------------------------------------------


def test_guesses_from_scores_counts_both_ends() -> None:
    scores = [0.9, 0.1, 0.5, 0.8, 0.2, 0.7]
    included = [True, False, True, False, False, True]
    # top 2: 0.9 (in, right), 0.8 (out, wrong); bottom 2: 0.1 and 0.2 (both out, right)
    assert guesses_from_scores(scores, included, 2, 2) == (4, 3)
    assert guesses_from_scores(scores, included, 0, 0) == (0, 0)
    assert guesses_from_scores(scores, included, 6, 0) == (6, 3)
    assert guesses_from_scores(scores, included, 0, 3) == (3, 2)  # 0.1, 0.2, 0.5
    # equal scores: taken in position order from the top, the last positions from the bottom
    assert guesses_from_scores([1.0] * 4, [True, False, False, True], 1, 1) == (2, 1)
    with pytest.raises(ValueError, match="k_plus"):
        guesses_from_scores(scores, included, 4, 3)


def test_default_grid_depends_on_m_only() -> None:
    assert default_k_grid(1000) == [(k, k) for k in (1, 2, 5, 10, 20, 50, 100, 200, 500)]
    assert default_k_grid(2) == [(1, 1)]
    assert default_k_grid(25) == [(k, k) for k in (1, 2, 5, 10, 12)]
    with pytest.raises(ValueError, match="m >= 2"):
        default_k_grid(1)


def test_best_bound_over_the_grid_is_bonferroni_corrected() -> None:
    rng = np.random.default_rng(7)
    m = 1000
    included = rng.random(m) < 0.5
    scores = included * 1.5 + rng.standard_normal(m)  # a fair membership signal
    result = best_epsilon_lower_bound(scores, included, delta=1e-5)
    grid = default_k_grid(m)
    assert result.significance == pytest.approx(0.05 / len(grid))
    each = [
        epsilon_lower_bound(
            m, *guesses_from_scores(scores, included, kp, km), 1e-5, 1 - result.significance
        )
        for kp, km in grid
    ]
    assert result.epsilon == max(each) > 0
    assert (result.k_plus, result.k_minus) == grid[each.index(max(each))]
    assert (result.guesses, result.correct) == guesses_from_scores(
        scores, included, result.k_plus, result.k_minus
    )
    uncorrected = best_epsilon_lower_bound(scores, included, delta=1e-5, bonferroni=False)
    assert uncorrected.epsilon > result.epsilon
    assert uncorrected.significance == pytest.approx(0.05)
    # perfect separation, exactly m / 2 canaries in: the largest k wins with a large bound
    balanced = rng.permutation(np.arange(m) < m // 2)
    perfect = best_epsilon_lower_bound(balanced.astype(float), balanced, delta=1e-5)
    assert (perfect.guesses, perfect.correct) == (m, m) and perfect.epsilon > 5.0


# --- coverage on randomized response with a known epsilon -----------------------------------


def test_bound_stays_below_the_true_epsilon_of_randomized_response() -> None:
    """Each of m guesses is right with probability e^eps / (1 + e^eps), exactly what an
    eps-DP randomized response on each canary's bit allows; at 95% confidence the bound may
    exceed the true eps in at most ~5% of the runs."""
    eps_true, m, trials = 2.0, 1000, 2000
    q = randomized_response_accuracy(eps_true)
    rng = np.random.default_rng(20230515)
    correct = rng.binomial(m, q, size=trials)
    bounds = np.array([epsilon_lower_bound(m, m, int(v), 0.0) for v in correct])
    coverage = np.mean(bounds < eps_true)
    assert coverage >= 0.94
    assert np.median(bounds) > 1.5  # and the bound has power: it is not trivially 0


def test_scores_pipeline_with_delta_stays_below_the_true_epsilon() -> None:
    """Randomized response on each canary's inclusion bit, auditor scores = the response plus
    a tie-breaking jitter independent of the bits, guesses from the default k grid with
    Bonferroni, delta > 0: the bound stays under eps and close to it on most runs."""
    eps_true, m, trials, delta = 3.0, 400, 30, 1e-5
    q = randomized_response_accuracy(eps_true)
    rng = np.random.default_rng(11)
    bounds = []
    for _ in range(trials):
        included = rng.random(m) < 0.5
        response = np.where(rng.random(m) < q, included, ~included)
        scores = response + 0.5 * rng.random(m)
        bounds.append(best_epsilon_lower_bound(scores, included, delta).epsilon)
    bounds_arr = np.array(bounds)
    assert np.mean(bounds_arr < eps_true) >= 0.95
    assert np.median(bounds_arr) > 1.0
