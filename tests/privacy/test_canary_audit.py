"""White-box one-run canary audit (privacy/canary_audit.py): the score/guess pipeline by hand,
the views each trust model gives, and the audit itself at the default setting: below the
target for the correct mechanism, above it for each test-only broken mechanism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fpl_bench.privacy.audit_bound import epsilon_lower_bound, guesses_from_scores
from fpl_bench.privacy.canary_audit import (
    AuditSetting,
    Variant,
    canary_directions,
    canary_scores,
    claimed_noise_multiplier,
    run_canary_audit,
    simulate_view,
    spent_epsilon,
)

SETTING = AuditSetting()  # m = 1000, d = 1024, T = 200, q = 0.2, K = 16, eps = 2, delta = 1e-5
CORRECT_SEEDS = (0, 1, 2, 3, 4)
BROKEN_SEEDS = (0, 1, 2)
# (variant, trust) pairs where the variant breaks the claimed guarantee; NOISE_SPLIT's shares
# add up to the right noise when the attacker only sees the sum (server trust)
BROKEN = [
    (Variant.NO_NOISE, "client"),
    (Variant.NO_NOISE, "server"),
    (Variant.BATCH_CLIP, "client"),
    (Variant.BATCH_CLIP, "server"),
    (Variant.NOISE_SPLIT, "client"),
    (Variant.MISREPORTED_RATE, "client"),
    (Variant.MISREPORTED_RATE, "server"),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Hundreds of tiny tensor ops per audit: one thread avoids contention on shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _small(**changes) -> AuditSetting:
    base = {"canaries": 2, "dim": 3, "steps": 3, "sample_rate": 1.0, "clients": 2}
    return AuditSetting(**(base | changes))


def _dirac(m: int, d: int) -> torch.Tensor:
    return torch.eye(d)[:m]


def _view(setting, variant, trust, directions, included, *, sigma=0.0, seed=0):
    """simulate_view's (rows, E) for these canaries, at the claimed sigma (0: noise-free)."""
    kw = {"noise_multiplier": sigma, "directions": directions, "seed": seed}
    return simulate_view(setting, variant, trust, included=np.asarray(included), **kw)


# --- (c) by hand ------------------------------------------------------------------------------


def test_scores_and_guesses_by_hand() -> None:
    # Prepare: 4 Dirac canaries on coordinates 0..3 of R^5, two observed steps divided by
    # E[B] = 2, C = 0.5; coordinate 4 carries no canary
    directions = _dirac(4, 5)
    rows = torch.tensor([[0.25, 0.0, 0.5, -0.25, 7.0], [0.25, -0.5, 0.0, 0.0, -7.0]])
    included = [True, False, False, True]
    # Execute
    scores = canary_scores(rows, directions, expected_batch=2.0, clip_norm=0.5)
    # Assert: (2 / 0.5) * column sums [0.5, -0.5, 0.5, -0.25]
    np.testing.assert_allclose(scores, [2.0, -2.0, 2.0, -1.0])
    # k = 1: "in" for canary 0 (tied with 2, first by position: in), "out" for canary 1 (out)
    assert guesses_from_scores(scores, included, 1, 1) == (2, 2)
    # k = 2: in for 0 (right) and 2 (wrong); out for 1 (right) and 3 (wrong)
    assert guesses_from_scores(scores, included, 2, 2) == (4, 2)
    # 2 of 2 right: Clopper-Pearson lower bound 0.05^(1/2) = 0.22 < 1/2, so no evidence
    assert epsilon_lower_bound(4, 2, 2, delta=0.0) == 0.0


def test_noise_free_views_by_hand() -> None:
    # C = 0.5, canaries of norm 3 (clipped to 0.5), q = 1, 3 steps, canary 0 in, canary 1 out:
    # n = 1 example, E[B] = 1; each step o_t = C u_0 / 1
    setting = _small(clip_norm=0.5, canary_norm=3.0, momentum=0.5)
    directions = _dirac(2, 3)
    included = np.array([True, False])
    client_rows, client_e = _view(setting, Variant.CORRECT, "client", directions, included)
    assert client_e == 1.0
    torch.testing.assert_close(client_rows, torch.tensor([[0.5, 0.0, 0.0]] * 3))
    np.testing.assert_allclose(
        canary_scores(client_rows, directions, expected_batch=1.0, clip_norm=0.5), [3.0, 0.0]
    )
    # server: divided by K E[B] = 2; momentum 0.5 weights w_t = (1 - 0.5^(3 - t)) / 0.5 for
    # t = 0, 1, 2: 1.75, 1.5, 1; so the canary's score is 1.75 + 1.5 + 1 = 4.25
    server_rows, server_e = _view(setting, Variant.CORRECT, "server", directions, included)
    assert server_e == 2.0
    torch.testing.assert_close(server_rows, torch.tensor([[4.25 * 0.5 / 2, 0.0, 0.0]]))
    np.testing.assert_allclose(
        canary_scores(server_rows, directions, expected_batch=2.0, clip_norm=0.5), [4.25, 0.0]
    )


def test_batch_clip_amplifies_a_canary_by_expected_batch_over_sqrt_k() -> None:
    # both canaries in, 2 zero-gradient examples, q = 1: B_t = E[B] = 4; the batch mean
    # 3 (u_0 + u_1) / 4 has norm 1.06 > C = 0.5, so it is clipped to 0.5 (u_0 + u_1) / sqrt(2);
    # each canary scores (E[B] / C) * 0.5 / sqrt(2) = 4 / sqrt(2) per step, 1 per step when
    # each sample is clipped
    setting = _small(clip_norm=0.5, canary_norm=3.0, background=2)
    directions = _dirac(2, 3)
    included = np.array([True, True])
    scores = {}
    for variant in (Variant.CORRECT, Variant.BATCH_CLIP):
        rows, expected = _view(setting, variant, "client", directions, included)
        assert expected == 4.0
        scores[variant] = canary_scores(rows, directions, expected_batch=4.0, clip_norm=0.5)
    np.testing.assert_allclose(scores[Variant.CORRECT], [3.0, 3.0])
    np.testing.assert_allclose(scores[Variant.BATCH_CLIP], [6 * math.sqrt(2)] * 2, rtol=1e-6)


def test_no_noise_audit_bound_is_the_closed_form_for_all_correct_guesses() -> None:
    # q = 1 and no noise: included canaries score T, the others 0; every guess of a (k, k)
    # split with k <= min(#in, #out) is right, and with delta = 0 the bound is
    # logit(alpha^(1 / 2k)) (Clopper-Pearson with all 2k right)
    setting = _small(canaries=40, dim=40, steps=2)
    directions = canary_directions(canaries=40, dim=40, generator=torch.Generator().manual_seed(3))
    included = np.random.default_rng(3).random(40) < 0.5
    rows, expected = _view(setting, Variant.NO_NOISE, "client", directions, included, seed=3)
    scores = canary_scores(rows, directions, expected_batch=expected, clip_norm=1.0)
    np.testing.assert_allclose(scores, 2.0 * included)
    k = int(min(included.sum(), (~included).sum()))
    assert guesses_from_scores(scores, included, k, k) == (2 * k, 2 * k)
    p = 0.05 ** (1 / (2 * k))
    expected_eps = math.log(p / (1 - p))
    assert epsilon_lower_bound(40, 2 * k, 2 * k, delta=0.0) == pytest.approx(expected_eps)


# --- the mechanism as each trust model shows it -------------------------------------------------


def test_dirac_canaries_are_orthonormal_on_distinct_coordinates() -> None:
    u = canary_directions(canaries=50, dim=64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(u @ u.T, torch.eye(50))
    assert set(torch.count_nonzero(u, dim=1).tolist()) == {1}


@pytest.mark.parametrize(
    ("variant", "trust", "std_in_c"),
    [
        # score units: (E / C) * noise; client rows carry sigma (sigma / sqrt(K) for the split);
        # the server's one row sums w_t-weighted draws of sigma C over K E[B]
        (Variant.CORRECT, "client", lambda s, w: s),
        (Variant.NOISE_SPLIT, "client", lambda s, w: s / 4),
        (Variant.CORRECT, "server", lambda s, w: s * w),
        (Variant.NOISE_SPLIT, "server", lambda s, w: s * w),
    ],
)
def test_noise_on_non_canary_coordinates_matches_the_trust_model(variant, trust, std_in_c):
    setting = AuditSetting(canaries=2, dim=2002)  # the default's sigma, K = 16, beta = 0.9
    sigma = claimed_noise_multiplier(setting, variant)
    directions = _dirac(2, 2002)
    rows, expected = _view(setting, variant, trust, directions, np.array([True, True]), sigma=sigma)
    noise = rows[:, 2:].flatten().double() * expected / setting.clip_norm
    weights = [(1 - 0.9 ** (200 - t)) / 0.1 for t in range(200)]
    expected_std = std_in_c(sigma, math.sqrt(sum(w * w for w in weights)))
    assert float(noise.std()) == pytest.approx(expected_std, rel=0.05)


def test_setting_refuses_inconsistent_values() -> None:
    for bad in (
        {"canaries": 2000},  # more canaries than dimensions
        {"sample_rate": 0.0},
        {"canary_norm": 0.5},  # below C = 1: clipping would not bind
        {"momentum": 1.0},
        {"misreport_factor": 0.5},
    ):
        with pytest.raises(ValueError):
            AuditSetting(**bad)


# --- the audit at the default setting (items 3 and 4 of issue 28) ----------------------------


def test_default_setting_is_one_where_the_accountant_says_broken() -> None:
    # the correct mechanism spends at most the target; each broken one, run on the canaries'
    # data, spends far more (NOISE_SPLIT only where the attacker sees each upload)
    assert spent_epsilon(SETTING, Variant.CORRECT, "client") <= SETTING.eps
    assert spent_epsilon(SETTING, Variant.NOISE_SPLIT, "server") <= SETTING.eps
    for variant, trust in BROKEN:
        assert spent_epsilon(SETTING, variant, trust) > 5 * SETTING.eps


@pytest.mark.parametrize("trust", ["client", "server"])
@pytest.mark.parametrize("seed", CORRECT_SEEDS)
def test_correct_mechanism_bound_stays_below_target(trust, seed) -> None:
    audit = run_canary_audit(SETTING, Variant.CORRECT, trust, seed=seed)
    # the canaries are seen (the bound is not the trivial 0) but not beyond the guarantee
    assert 0.0 < audit.bound.epsilon <= SETTING.eps


@pytest.mark.parametrize("seed", BROKEN_SEEDS)
def test_noise_split_is_sound_when_only_the_sum_is_seen(seed) -> None:
    audit = run_canary_audit(SETTING, Variant.NOISE_SPLIT, "server", seed=seed)
    assert audit.bound.epsilon <= SETTING.eps


@pytest.mark.parametrize(("variant", "trust"), BROKEN)
@pytest.mark.parametrize("seed", BROKEN_SEEDS)
def test_broken_mechanism_bound_exceeds_target(variant, trust, seed) -> None:
    audit = run_canary_audit(SETTING, variant, trust, seed=seed)
    assert audit.margin > 0, f"{variant.value} under {trust} trust, seed {seed}: {audit}"
