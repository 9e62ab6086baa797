"""Noise calibration and privacy accounting for DP-SGD on Opacus' accountants.

The mechanism (privacy/mechanism.py) is the Poisson-subsampled Gaussian mechanism: each step
samples every example of a client with probability q, clips per-sample gradients to C and adds
N(0, sigma^2 C^2). Over `steps` such steps that touch a client's data, its privacy loss is
computed by one of two accountants:

- "rdp": Renyi DP (Mironov 2017, arXiv 1702.07476) of the sampled Gaussian mechanism
  (Mironov, Talwar, Zhang 2019, arXiv 1908.10530), composed additively over steps and converted
  to (eps, delta) with Thm. 21 of Balle et al. 2020 (arXiv 1905.09982):
  `opacus.accountants.analysis.rdp.compute_rdp` / `get_privacy_spent` via `RDPAccountant`.
  The orders are Opacus' default grid (1.1 .. 63) plus `EXTRA_RDP_ORDERS` up to 1024: with the
  default grid alone eps cannot go below about log(1/delta)/62 (0.19 at delta = 1e-5) however
  large sigma is; the extra orders only add candidates to the minimum, so whenever the best
  order lies inside Opacus' grid the result is identical to `RDPAccountant.get_epsilon`.
- "prv": numerical composition of privacy loss random variables (Gopi, Lee, Wutschitz 2021,
  arXiv 2106.02848) via `opacus.accountants.PRVAccountant`; tighter, and Opacus reports the
  upper end of its error interval, so it is still a guarantee.

`calibrate_noise` finds sigma for a target (eps, delta) with
`opacus.accountants.utils.get_noise_multiplier` (doubling, then bisection; it returns the upper
bracket) and then re-checks the answer with `epsilon_spent`, nudging sigma up until
eps_spent <= eps_target holds, so a recorded ledger never claims more privacy than it has.
The "paper" calibration reproduces DP-FPL's closed form (Tran et al., ICLR 2025) and reports
what the RDP accountant gives for it.

Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (arXiv 1607.00133), Alg. 1,
is the training algorithm being accounted for.

Both functions are pure in their (hashable) arguments and memoised in-process: a job's methods
share their (q, steps) and so one calibration (about 25 s of Opacus' series over the fractional
orders on one CPU core), and the answer is the same value either way.

    >>> round(epsilon_spent(noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=1e-5), 3)
    2.101
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fpl_bench.errors import UsageError

__all__ = [
    "ACCOUNTANTS",
    "CALIBRATIONS",
    "EXTRA_RDP_ORDERS",
    "PRV_MAX_EPSILON",
    "RDP_ORDERS",
    "SIGMA_FLOOR",
    "PrivacyLedger",
    "calibrate_noise",
    "check_supported_epsilon",
    "epsilon_spent",
    "max_supported_epsilon",
    "paper_noise",
    "plan_privacy",
    "use_calibration_cache",
]

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
CALIBRATIONS: tuple[str, ...] = ("rdp", "prv", "paper")

EXTRA_RDP_ORDERS: tuple[int, ...] = (64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 768, 1024)
RDP_ORDERS: tuple[float, ...] = (*RDPAccountant.DEFAULT_ALPHAS, *EXTRA_RDP_ORDERS)

# After Opacus' bisection, sigma is multiplied by this until the accountant confirms the target
# (the PRV estimate is numerical; its reported upper bound can land a hair above the target).
_BUMP = 1.001
_MAX_BUMPS = 200

# The smallest noise multiplier a calibration may return: sigma = 0.05 adds noise of 5% of the
# clipping norm, which protects nothing (it spends eps >= 130 in one step at any q >= 1e-6 and
# delta <= 1e-3), and below it Opacus' bisection can neither reach its absolute tolerance at a
# huge target (eps = 1e50 is spent by sigma ~ 1e-25) nor end. A target above what
# `SIGMA_FLOOR` spends is refused, naming that epsilon (`max_supported_epsilon`).
SIGMA_FLOOR = 0.05
# Opacus' PRV accountant evaluates exp(privacy loss) in float64, which overflows near eps = 709;
# above it PRV reports inf and the bisection does not end. Targets above this are refused.
PRV_MAX_EPSILON = 500.0


def _accountant_kwargs(accountant: str) -> dict[str, Any]:
    """Extra arguments for `IAccountant.get_epsilon`: the RDP orders for "rdp"."""
    return {"alphas": list(RDP_ORDERS)} if accountant == "rdp" else {}


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise UsageError(
            f"--accountant {accountant!r} is not an accountant; choose one of {', '.join(ACCOUNTANTS)}"
        )


def _check_common(*, eps: float, delta: float, sample_rate: float, steps: int) -> None:
    if not (eps > 0 and math.isfinite(eps)):
        raise UsageError(f"--eps must be a finite number > 0, got {eps}")
    if not 0 < delta < 1:
        raise UsageError(f"--delta must be in (0, 1), got {delta}")
    if not 0 < sample_rate <= 1:
        raise UsageError(
            f"sample rate must be in (0, 1], got {sample_rate} "
            "(it is --batch-size over a client's training examples)"
        )
    if int(steps) != steps or steps < 1:
        raise UsageError(
            f"noisy steps per client must be an integer >= 1, got {steps} "
            "(check --rounds and --local-epochs)"
        )


@functools.lru_cache(maxsize=4096)
def epsilon_spent(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """eps of `steps` Poisson-subsampled Gaussian steps (rate q, noise multiplier sigma) at
    `delta`, by the RDP (Mironov 2017; Mironov et al. 2019) or PRV (Gopi et al. 2021) accountant.

    Degenerate cases first: no steps or q = 0 spend 0; sigma = 0 spends inf.
    """
    _check_accountant(accountant)
    if steps < 0 or not 0 <= sample_rate <= 1 or noise_multiplier < 0 or not 0 < delta < 1:
        raise ValueError(
            f"bad accounting input: sigma={noise_multiplier}, q={sample_rate}, "
            f"steps={steps}, delta={delta}"
        )
    if steps == 0 or sample_rate == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    with warnings.catch_warnings():
        if (
            accountant == "prv"
        ):  # its domain sizing runs an RDP accountant that warns about its grid
            warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta, **_accountant_kwargs(accountant)))


_CACHE_DIR: list[Path] = []  # where calibrated sigmas are kept on disk (use_calibration_cache)


def use_calibration_cache(directory: Path | None) -> None:
    """Keep every calibrated sigma in `directory` (one small JSON file per setting) so that
    worker processes and later jobs skip the search (Opacus' RDP series at a large sampling rate
    takes ~20 s per setting on a laptop core); None turns the disk cache off. A stored sigma is
    used only if its file names exactly this setting and the accountant confirms that it meets
    the target; anything else (a corrupt, stale or edited file) is searched again."""
    _CACHE_DIR[:] = [] if directory is None else [Path(directory)]


def _cache_key(**setting: Any) -> dict[str, Any]:
    return {
        "format": 1,
        "opacus": version("opacus"),
        "orders": list(RDP_ORDERS),
        "bump": _BUMP,
        **setting,
    }


def _cache_file(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return _CACHE_DIR[0] / f"sigma-{digest}.json"


def _cached_sigma(key: dict[str, Any]) -> float | None:
    """The stored sigma for `key` if a file for exactly this key holds a positive number."""
    if not _CACHE_DIR:
        return None
    try:
        data = json.loads(_cache_file(key).read_text())
        sigma = float(data["sigma"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if data.get("key") != key or not (sigma > 0 and math.isfinite(sigma)):
        return None
    return sigma


def _store_sigma(key: dict[str, Any], sigma: float) -> None:
    if not _CACHE_DIR:
        return
    path = _cache_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "sigma": sigma}, sort_keys=True))
        os.replace(tmp, path)  # atomic: concurrent workers write the same value
    except OSError:
        pass  # a read-only cache only costs the search next time


def max_supported_epsilon(
    *, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """The largest target epsilon `calibrate_noise` accepts for (q, steps, delta): what sigma =
    `SIGMA_FLOOR` spends under the RDP accountant (fast and exact at any sigma), and at most
    `PRV_MAX_EPSILON` for "prv"."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # at so little noise the best RDP order is the smallest
        spent = epsilon_spent(
            noise_multiplier=SIGMA_FLOOR, sample_rate=sample_rate, steps=steps, delta=delta
        )
    return min(spent, PRV_MAX_EPSILON) if accountant == "prv" else spent


def check_supported_epsilon(
    *, eps: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> None:
    """UsageError, naming the largest supported epsilon (`max_supported_epsilon`), if `eps`
    is above it: what `calibrate_noise` and `plan_privacy` refuse, checkable before a job."""
    largest = max_supported_epsilon(
        sample_rate=sample_rate, steps=steps, delta=delta, accountant=accountant
    )
    if eps <= largest:
        return
    why = (
        f"is above {PRV_MAX_EPSILON:g}, where the prv accountant overflows"
        if largest == PRV_MAX_EPSILON
        else f"needs a noise multiplier below {SIGMA_FLOOR} (no meaningful privacy)"
    )
    shown = f"{math.floor(largest * 100) / 100:g}"  # rounded down: itself accepted
    raise UsageError(
        f"--eps {eps:g} {why}; the largest supported epsilon at sample rate {sample_rate:.4g}, "
        f"{steps} noisy steps, delta {delta:g} and accountant {accountant} is {shown}: "
        f"use --eps {shown} or less, or --eps none to train without DP"
    )


@functools.lru_cache(maxsize=1024)
def calibrate_noise(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest sigma (to within a tolerance in eps) with eps(sigma; q, steps, delta) <=
    target_epsilon under `accountant`.

    The tolerance is `epsilon_tolerance` (absolute, as in Opacus) capped at 1% of the target,
    so that a small budget (eps = 0.05, say) is not spent only in part. PRV's epsilon is the
    upper end of Opacus' error interval (estimate + 0.01), so at eps below about 0.5 it is not
    tighter than RDP.

    Opacus' `get_noise_multiplier` doubles sigma from 20 until the target is met (giving up
    above sigma = 1e6), then bisects and returns the upper bracket. The result is checked with
    `epsilon_spent` and raised by 0.1% steps until it provably meets the target.
    UsageError when no sigma in the search range meets it (budget too small for the settings).
    With `use_calibration_cache` the result is also kept on disk and read back (checked).
    """
    _check_accountant(accountant)
    _check_common(eps=target_epsilon, delta=target_delta, sample_rate=sample_rate, steps=steps)
    check_supported_epsilon(
        eps=target_epsilon,
        delta=target_delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant=accountant,
    )
    if not epsilon_tolerance > 0:
        raise ValueError(f"epsilon_tolerance must be > 0, got {epsilon_tolerance}")
    key = _cache_key(
        target_epsilon=float(target_epsilon),
        target_delta=float(target_delta),
        sample_rate=float(sample_rate),
        steps=int(steps),
        accountant=accountant,
        epsilon_tolerance=float(epsilon_tolerance),
    )
    stored = _cached_sigma(key)
    meets = functools.partial(
        _meets,
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant=accountant,
    )
    if stored is not None and meets(stored):
        return stored
    sigma = _search_sigma(meets, epsilon_tolerance=epsilon_tolerance, **meets.keywords)
    _store_sigma(key, sigma)
    return sigma


def _meets(
    sigma: float,
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
) -> bool:
    """Whether `sigma` spends at most target_epsilon (the accountant's word)."""
    spent = epsilon_spent(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps=steps,
        delta=target_delta,
        accountant=accountant,
    )
    return spent <= target_epsilon


def _search_sigma(
    meets: Callable[[float], bool],
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    epsilon_tolerance: float,
) -> float:
    """`calibrate_noise`'s search (its docstring), without the caches; `meets(sigma)` checks."""
    setting = (
        f"eps={target_epsilon}, delta={target_delta}, sample rate {sample_rate:.4g}, "
        f"{steps} noisy steps, accountant {accountant}"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # grid-edge warnings of the search's trial sigmas
            sigma = float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=target_delta,
                    sample_rate=sample_rate,
                    steps=int(steps),
                    accountant=accountant,
                    epsilon_tolerance=min(epsilon_tolerance, 0.01 * target_epsilon),
                    **_accountant_kwargs(accountant),
                )
            )
    except (ValueError, RuntimeError) as err:
        raise UsageError(
            f"no noise multiplier up to 1e6 meets {setting} ({err}); "
            "raise --eps or --delta, or train fewer steps"
        ) from err
    for _ in range(_MAX_BUMPS):
        if meets(sigma):
            return sigma
        sigma *= _BUMP
    raise RuntimeError(f"calibrated sigma={sigma} still exceeds the target for {setting}")


def paper_noise(*, target_epsilon: float, target_delta: float, rounds: int) -> float:
    """DP-FPL's closed form sigma = sqrt(T log(1/delta)) / eps with T = rounds (Tran et al.,
    "Privacy-Preserving Personalized Federated Prompt Learning for Multimodal Large Language
    Models", ICLR 2025; reference code linhhtran/DP-FPL).

    Kept for reproduction only: it ignores sub-sampling and the number of local steps, so it is
    not a guarantee by itself; `plan_privacy` reports the RDP epsilon it actually gives.
    """
    if not target_epsilon > 0:
        raise UsageError(f"--eps must be > 0, got {target_epsilon}")
    if not 0 < target_delta < 1:
        raise UsageError(f"--delta must be in (0, 1), got {target_delta}")
    if rounds < 1:
        raise UsageError(f"--rounds must be >= 1, got {rounds}")
    return math.sqrt(rounds * math.log(1.0 / target_delta)) / target_epsilon


@dataclass(frozen=True)
class PrivacyLedger:
    """What a DP run records (its MLflow params `privacy.*` and its results row): the target,
    how sigma was chosen, the mechanism's parameters per client (C, q, noisy steps) and the
    epsilon spent."""

    eps_target: float
    delta: float
    calibration: str  # "rdp" | "prv" | "paper"
    accountant: str  # accountant that computed eps_spent: "rdp" | "prv"
    noise_multiplier: float  # sigma
    clip_norm: float  # C
    sample_rate: float  # q (Poisson)
    steps: int  # noisy steps that touch one client's data over the run
    eps_spent: float


def plan_privacy(
    *,
    eps: float,
    delta: float,
    clip_norm: float,
    sample_rate: float,
    steps: int,
    rounds: int,
    calibration: str = "rdp",
) -> PrivacyLedger:
    """Pick sigma for a client with Poisson rate `sample_rate` and `steps` noisy steps.

    calibration "rdp"/"prv": `calibrate_noise` with that accountant, eps_spent from the same
    one (always <= eps). "paper": `paper_noise` with T = rounds, eps_spent from the RDP
    accountant; UsageError if that exceeds eps.
    """
    if calibration not in CALIBRATIONS:
        raise UsageError(
            f"--accountant {calibration!r} is not a calibration; choose one of {', '.join(CALIBRATIONS)}"
        )
    _check_common(eps=eps, delta=delta, sample_rate=sample_rate, steps=steps)
    if not clip_norm > 0:
        raise UsageError(f"--clip-norm must be > 0, got {clip_norm}")
    if calibration == "paper":
        accountant = "rdp"
        check_supported_epsilon(
            eps=eps, delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant
        )
        sigma = paper_noise(target_epsilon=eps, target_delta=delta, rounds=rounds)
    else:
        accountant = calibration
        sigma = calibrate_noise(
            target_epsilon=eps,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    spent = epsilon_spent(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        accountant=accountant,
    )
    if spent > eps:
        if calibration == "paper":
            raise UsageError(
                f"the paper's closed form sigma={sigma:.4g} (T={rounds}) does not meet --eps {eps} "
                f"under RDP for these settings (RDP gives eps={spent:.4g} at sample rate "
                f"{sample_rate:.4g}, {steps} steps); use --accountant rdp"
            )
        raise RuntimeError(f"calibrated sigma={sigma} spends eps={spent} > target {eps}")
    return PrivacyLedger(
        eps_target=float(eps),
        delta=float(delta),
        calibration=calibration,
        accountant=accountant,
        noise_multiplier=float(sigma),
        clip_norm=float(clip_norm),
        sample_rate=float(sample_rate),
        steps=int(steps),
        eps_spent=float(spent),
    )
