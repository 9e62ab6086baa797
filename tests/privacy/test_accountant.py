"""Noise calibration and accounting on Opacus' accountants."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
from opacus.accountants import RDPAccountant

from fpl_bench.errors import UsageError
from fpl_bench.privacy.accountant import (
    ACCOUNTANTS,
    CALIBRATIONS,
    PrivacyLedger,
    calibrate_noise,
    epsilon_spent,
    paper_noise,
    plan_privacy,
)

DELTA = 1e-5
Q, STEPS = 0.05, 100


def test_names() -> None:
    assert ACCOUNTANTS == ("rdp", "prv", "pld")
    assert CALIBRATIONS == ("rdp", "prv", "pld", "paper")


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibrate_meets_target(accountant: str) -> None:
    target = 1.0
    sigma = calibrate_noise(
        target_epsilon=target,
        target_delta=DELTA,
        sample_rate=Q,
        steps=STEPS,
        accountant=accountant,
    )
    spent = epsilon_spent(
        noise_multiplier=sigma, sample_rate=Q, steps=STEPS, delta=DELTA, accountant=accountant
    )
    assert spent <= target
    assert spent >= 0.95 * target


def test_small_target_uses_budget() -> None:
    """Below Opacus' default RDP grid floor (~0.19 at delta 1e-5) and with a relative tolerance."""
    sigma = calibrate_noise(target_epsilon=0.05, target_delta=DELTA, sample_rate=Q, steps=STEPS)
    spent = epsilon_spent(noise_multiplier=sigma, sample_rate=Q, steps=STEPS, delta=DELTA)
    assert 0.95 * 0.05 <= spent <= 0.05


def test_rdp_matches_opacus_accountant() -> None:
    sigma, q, steps = 1.1, 0.02, 500
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    expected = acc.get_epsilon(delta=DELTA)
    got = epsilon_spent(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA)
    assert got == pytest.approx(expected, rel=1e-12)
    assert 1.0 < got < 3.0


def test_epsilon_degenerate() -> None:
    kw = {"sample_rate": Q, "delta": DELTA}
    assert epsilon_spent(noise_multiplier=1.0, steps=0, **kw) == 0.0
    assert epsilon_spent(noise_multiplier=0.0, steps=10, **kw) == math.inf


def test_monotone_in_eps() -> None:
    sigmas = [
        calibrate_noise(target_epsilon=e, target_delta=DELTA, sample_rate=Q, steps=STEPS)
        for e in (0.5, 1.0, 2.0)
    ]
    assert sigmas[0] > sigmas[1] > sigmas[2]


def test_paper_noise_closed_form() -> None:
    got = paper_noise(target_epsilon=0.5, target_delta=1e-5, rounds=100)
    assert got == pytest.approx(math.sqrt(100 * math.log(1e5)) / 0.5, rel=1e-12)
    assert got == pytest.approx(67.8614, rel=1e-5)


def test_plan_paper_records_rdp_epsilon() -> None:
    ledger = plan_privacy(
        eps=1.0,
        delta=DELTA,
        clip_norm=1.0,
        sample_rate=Q,
        steps=STEPS,
        rounds=10,
        calibration="paper",
    )
    sigma = math.sqrt(10 * math.log(1 / DELTA))
    assert ledger.noise_multiplier == pytest.approx(sigma)
    assert ledger.calibration == "paper" and ledger.accountant == "rdp"
    assert ledger.eps_spent == pytest.approx(
        epsilon_spent(noise_multiplier=sigma, sample_rate=Q, steps=STEPS, delta=DELTA)
    )
    assert ledger.eps_spent <= ledger.eps_target


def test_plan_paper_rejects_when_it_misses_the_target() -> None:
    # q = 1 and many steps: the closed form (T = rounds = 1) is far too little noise
    with pytest.raises(UsageError, match="--accountant rdp"):
        plan_privacy(
            eps=1.0,
            delta=DELTA,
            clip_norm=1.0,
            sample_rate=1.0,
            steps=50,
            rounds=1,
            calibration="paper",
        )


def test_plan_rdp_ledger() -> None:
    ledger = plan_privacy(
        eps=2.0, delta=DELTA, clip_norm=0.5, sample_rate=Q, steps=STEPS, rounds=10
    )
    assert isinstance(ledger, PrivacyLedger)
    assert ledger.accountant == "rdp" and ledger.calibration == "rdp"
    assert 0.95 * 2.0 <= ledger.eps_spent <= 2.0
    d = asdict(ledger)  # as the run logs it
    assert d["clip_norm"] == 0.5 and d["steps"] == STEPS
    with pytest.raises(AttributeError):
        ledger.eps_spent = 0.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kw", "flag"),
    [
        ({"eps": 0.0}, "--eps"),
        ({"eps": -1.0}, "--eps"),
        ({"delta": 0.0}, "--delta"),
        ({"delta": 1.0}, "--delta"),
        ({"clip_norm": 0.0}, "--clip-norm"),
        ({"clip_norm": -1.0}, "--clip-norm"),
        ({"sample_rate": 0.0}, "sample rate"),
        ({"sample_rate": 1.5}, "sample rate"),
        ({"steps": 0}, "steps"),
        ({"calibration": "gdp"}, "--accountant"),
    ],
)
def test_plan_rejects(kw: dict, flag: str) -> None:
    args = {
        "eps": 1.0,
        "delta": DELTA,
        "clip_norm": 1.0,
        "sample_rate": Q,
        "steps": STEPS,
        "rounds": 10,
        **kw,
    }
    with pytest.raises(UsageError, match=flag) as err:
        plan_privacy(**args)
    assert "\n" not in str(err.value)


def test_budget_too_small() -> None:
    with pytest.raises(UsageError, match="no noise multiplier"):
        calibrate_noise(target_epsilon=1e-4, target_delta=DELTA, sample_rate=1.0, steps=100)


def test_calibration_is_memoised_and_gives_the_same_sigma(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's methods share (q, steps): the second calibration must not rerun Opacus' search
    (about 25 s per run on one core), and must return the very same sigma."""
    import fpl_bench.privacy.accountant as acc

    kw = dict(target_epsilon=0.7, target_delta=1e-5, sample_rate=0.37, steps=23)
    real = acc.get_noise_multiplier
    calls = []

    def counted(**k: object) -> float:
        calls.append(k)
        return real(**k)

    monkeypatch.setattr(acc, "get_noise_multiplier", counted)
    first = calibrate_noise(**kw)
    assert len(calls) == 1
    assert calibrate_noise(**kw) == first
    assert len(calls) == 1  # served from the cache
    assert calibrate_noise(**{**kw, "steps": 24}) > first  # a new key searches again
    assert len(calls) == 2


def test_calibration_disk_cache_reuses_checked_sigmas(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """Worker processes and later jobs read a stored sigma instead of searching; a stored value
    that does not meet the target (an edited file) or a corrupt file is searched again."""
    import json

    import fpl_bench.privacy.accountant as acc

    kw = dict(target_epsilon=0.6, target_delta=1e-5, sample_rate=0.41, steps=19)
    real = acc.get_noise_multiplier
    calls: list[dict] = []

    def counted(**k: object) -> float:
        calls.append(k)
        return real(**k)

    monkeypatch.setattr(acc, "get_noise_multiplier", counted)
    acc.use_calibration_cache(tmp_path)
    try:
        first = calibrate_noise(**kw)
        (stored,) = tmp_path.glob("sigma-*.json")
        assert json.loads(stored.read_text())["sigma"] == first
        calibrate_noise.cache_clear()  # a new process: only the disk remembers
        assert calibrate_noise(**kw) == first
        assert len(calls) == 1
        data = json.loads(stored.read_text())
        stored.write_text(json.dumps({**data, "sigma": first / 2}))  # too little noise
        calibrate_noise.cache_clear()
        assert calibrate_noise(**kw) == first
        assert len(calls) == 2  # refused, searched again, and stored again
        assert json.loads(stored.read_text())["sigma"] == first
        stored.write_text("{not json")
        calibrate_noise.cache_clear()
        assert calibrate_noise(**kw) == first
        assert len(calls) == 3
    finally:
        acc.use_calibration_cache(None)
        calibrate_noise.cache_clear()


@pytest.mark.parametrize("calibration", ["rdp", "prv", "paper"])
@pytest.mark.parametrize("eps", [1e308, 1e50, 2e4])
def test_huge_target_is_refused_at_once_naming_the_largest_supported(
    calibration: str, eps: float
) -> None:
    """Opacus' bisection cannot end for such targets (an absolute tolerance of 0.01 at 1e50, or
    PRV's exp overflow): they are refused before it, with the epsilon that SIGMA_FLOOR spends."""
    import time

    from fpl_bench.privacy.accountant import PRV_MAX_EPSILON, SIGMA_FLOOR, max_supported_epsilon

    accountant = "rdp" if calibration == "paper" else calibration
    largest = max_supported_epsilon(sample_rate=0.25, steps=40, delta=DELTA, accountant=accountant)
    rdp_floor = epsilon_spent(noise_multiplier=SIGMA_FLOOR, sample_rate=0.25, steps=40, delta=DELTA)
    assert largest == (min(rdp_floor, PRV_MAX_EPSILON) if accountant == "prv" else rdp_floor)
    t0 = time.perf_counter()
    with pytest.raises(UsageError, match="largest supported epsilon") as err:
        plan_privacy(
            eps=eps,
            delta=DELTA,
            clip_norm=1.0,
            sample_rate=0.25,
            steps=40,
            rounds=4,
            calibration=calibration,
        )
    assert time.perf_counter() - t0 < 5
    assert f"is {math.floor(largest * 100) / 100:g}:" in str(err.value)
    assert "\n" not in str(err.value)


def test_largest_supported_target_is_accepted_with_sigma_at_the_floor() -> None:
    from fpl_bench.privacy.accountant import SIGMA_FLOOR, max_supported_epsilon

    largest = max_supported_epsilon(sample_rate=1.0, steps=2, delta=DELTA)
    sigma = calibrate_noise(
        target_epsilon=math.floor(largest * 100) / 100, target_delta=DELTA, sample_rate=1.0, steps=2
    )
    assert SIGMA_FLOOR <= sigma < 1.01 * SIGMA_FLOOR


def test_eps_up_to_100_is_supported_at_any_realistic_setting() -> None:
    """The floor leaves every budget up to 100 alone (one step, q down to 1e-4, delta to 1e-3)."""
    from fpl_bench.privacy.accountant import max_supported_epsilon

    for q in (1.0, 0.01, 1e-4):
        for delta in (1e-8, 1e-5, 1e-3):
            assert max_supported_epsilon(sample_rate=q, steps=1, delta=delta) > 100
