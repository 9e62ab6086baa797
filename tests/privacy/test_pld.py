"""`--accountant pld` (privacy/accountant.py `pld_epsilon`): an upper bound on the exact
epsilon, equal to dp_accounting's PLDAccountant on the same grid, below RDP; its calibration
meets the target and is cached under a key of its own."""

from __future__ import annotations

import json
import math
import sys

import pytest
from scipy.optimize import brentq
from scipy.stats import norm

pytest.importorskip("dp_accounting")

import fpl_bench.privacy.accountant as acc
from fpl_bench.errors import UsageError
from fpl_bench.privacy.accountant import (
    PLD_MAX_EPSILON,
    calibrate_noise,
    epsilon_spent,
    max_supported_epsilon,
    plan_privacy,
)
from fpl_bench.privacy.crosscheck import crosscheck, dp_accounting_epsilon, relative_gap
from fpl_bench.spec import FieldError, build_spec

DELTA = 1e-5
# The default job (`fpl-bench run`, 20 rounds of 2 local epochs): the 48-example clients'
# rate 32/48 and 80 noisy steps (benchmarks/accountant_tightness.py derives them as a run does).
Q, STEPS = 32 / 48, 80


def pld(sigma: float, q: float, steps: int, delta: float = DELTA) -> float:
    return epsilon_spent(
        noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant="pld"
    )


def rdp(sigma: float, q: float, steps: int, delta: float = DELTA) -> float:
    return epsilon_spent(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)


@pytest.mark.parametrize(
    ("setting", "expected"),
    [((1.0, 0.01, 1000), 1.828244), ((23.125, Q, 20), 0.452024), ((8.0, 1.0, 10), 1.534680)],
)
def test_pld_is_dp_accounting_pld_accountant(setting: tuple, expected: float) -> None:
    """Built directly (from_gaussian_mechanism, self_compose) it equals the PLDAccountant that
    the cross-check runs on the same event and grid, and the values measured once."""
    ours = pld(*setting)
    google = dp_accounting_epsilon(*setting, DELTA, "pld")
    assert ours == pytest.approx(google, rel=1e-9)
    assert ours == pytest.approx(expected, abs=2e-6)


def test_pld_upper_bounds_the_exact_gaussian() -> None:
    """q = 1: T steps are one Gaussian mechanism of noise sigma / sqrt(T), whose exact
    delta(eps) = Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s) (Balle & Wang 2018,
    arXiv 1805.06530, Thm. 8): PLD lies above it (pessimistic) by less than 0.1%, RDP by more."""
    sigma, steps = 8.0, 10
    s = sigma / math.sqrt(steps)

    def delta_of(eps: float) -> float:
        return norm.cdf(1 / (2 * s) - eps * s) - math.exp(eps) * norm.cdf(-1 / (2 * s) - eps * s)

    exact = brentq(lambda eps: delta_of(eps) - DELTA, 1e-6, 50.0, xtol=1e-12)
    got = pld(sigma, 1.0, steps)
    assert exact <= got <= exact * 1.001
    assert rdp(sigma, 1.0, steps) > 1.05 * exact


def test_pld_agrees_with_opacus_prv_and_is_below_rdp() -> None:
    """On the default job's setting at the sigma RDP calibrates for eps 0.5: PLD within 1% of
    Opacus' PRV estimate (another library, another discretisation), 9% below RDP."""
    sigma = calibrate_noise(target_epsilon=0.5, target_delta=DELTA, sample_rate=Q, steps=STEPS)
    r = crosscheck(sigma, Q, STEPS, DELTA)
    assert r["project_pld"] == pytest.approx(r["google_pld"], rel=1e-9)
    assert relative_gap(r["project_pld"], r["opacus_prv"]) < 0.01
    assert 0.085 < 1 - r["project_pld"] / r["opacus_rdp"] < 0.095  # measured 9.0%


@pytest.mark.parametrize("target", [0.5, 1.0])
def test_pld_calibration_meets_the_target_and_needs_less_noise(target: float) -> None:
    sigma = calibrate_noise(
        target_epsilon=target, target_delta=DELTA, sample_rate=Q, steps=STEPS, accountant="pld"
    )
    spent = pld(sigma, Q, STEPS)
    assert 0.99 * target - 1e-12 <= spent <= target
    assert pld(0.97 * sigma, Q, STEPS) > target  # not much more noise than needed
    sigma_rdp = calibrate_noise(
        target_epsilon=target, target_delta=DELTA, sample_rate=Q, steps=STEPS
    )
    assert 0.90 < sigma / sigma_rdp < 0.95


def test_plan_privacy_records_pld() -> None:
    ledger = plan_privacy(
        eps=1.0, delta=DELTA, clip_norm=1.0, sample_rate=Q, steps=STEPS, rounds=20,
        calibration="pld",
    )  # fmt: skip
    assert (ledger.calibration, ledger.accountant) == ("pld", "pld")
    assert ledger.eps_spent == pld(ledger.noise_multiplier, Q, STEPS) <= 1.0


def test_pld_calibration_cache_has_its_own_key(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A stored PLD sigma is keyed by dp_accounting's version and the grid rule as well, never
    shared with an RDP sigma of the same setting, and read back (checked) by a new process."""
    kw = dict(target_epsilon=0.8, target_delta=DELTA, sample_rate=0.3, steps=17)
    key_pld = acc._cache_key(**kw, accountant="pld", epsilon_tolerance=0.01)
    key_rdp = acc._cache_key(**kw, accountant="rdp", epsilon_tolerance=0.01)
    assert key_pld["dp_accounting"] == acc.version("dp-accounting")
    assert key_pld["pld_interval"] == [1e-4, 1e-4]
    assert "dp_accounting" not in key_rdp

    real = acc._bisect_sigma
    calls: list[float] = []

    def counted(*args: object, **k: object) -> float:
        calls.append(1.0)
        return real(*args, **k)

    monkeypatch.setattr(acc, "_bisect_sigma", counted)
    acc.use_calibration_cache(tmp_path)
    try:
        calibrate_noise.cache_clear()
        first = calibrate_noise(**kw, accountant="pld")
        second_rdp = calibrate_noise(**kw, accountant="rdp")
        files = {json.loads(f.read_text())["key"]["accountant"]: f for f in tmp_path.iterdir()}
        assert set(files) == {"pld", "rdp"}
        assert json.loads(files["pld"].read_text())["sigma"] == first
        assert first < second_rdp
        calibrate_noise.cache_clear()
        assert calibrate_noise(**kw, accountant="pld") == first
        assert len(calls) == 1  # the second process read it from disk
    finally:
        acc.use_calibration_cache(None)
        calibrate_noise.cache_clear()


def test_pld_refuses_a_target_above_its_cap() -> None:
    assert max_supported_epsilon(sample_rate=Q, steps=STEPS, delta=DELTA, accountant="pld") == (
        PLD_MAX_EPSILON
    )
    with pytest.raises(UsageError, match="above 100, where the pld accountant") as err:
        calibrate_noise(
            target_epsilon=150.0, target_delta=DELTA, sample_rate=Q, steps=STEPS, accountant="pld"
        )
    assert "is 100:" in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_accountant_names_pld() -> None:
    with pytest.raises(UsageError, match=r"choose one of rdp, prv, pld$"):
        epsilon_spent(noise_multiplier=1.0, sample_rate=Q, steps=1, delta=DELTA, accountant="x")


def test_without_dp_accounting_pld_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # import raises ImportError
    with pytest.raises(UsageError, match="pip install dp-accounting") as err:
        acc.pld_epsilon(noise_multiplier=3.0, sample_rate=Q, steps=3, delta=DELTA)
    assert "\n" not in str(err.value)


def test_spec_refuses_pld_without_dp_accounting(monkeypatch: pytest.MonkeyPatch) -> None:
    from fpl_bench.catalog import resolve_method

    methods = (resolve_method("coop"),)
    assert build_spec(methods=methods, accountant="pld").accountant == "pld"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "dp_accounting" else real(name, *a),
    )
    with pytest.raises(FieldError, match=r"accountant=pld: .*pip install dp-accounting"):
        build_spec(methods=methods, accountant="pld")
    assert build_spec(methods=methods, accountant="rdp").accountant == "rdp"
