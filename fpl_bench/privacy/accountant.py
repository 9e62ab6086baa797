"""Noise calibration and privacy accounting for DP-SGD on Opacus' accountants (and Google's
dp-accounting for the PLD one).

The mechanism (privacy/mechanism.py) is the Poisson-subsampled Gaussian mechanism: each step
samples every example of a client with probability q, clips per-sample gradients to C and adds
N(0, sigma^2 C^2). Over `steps` such steps that touch a client's data, its privacy loss is
computed by one of three accountants:

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
- "pld": the privacy loss distribution (Koskela, Jalko, Honkela 2020, arXiv 1906.03049),
  discretised by "connect the dots" (Doroshenko, Ghazi, Kamath, Kumar, Manurangsi 2022,
  arXiv 2207.04380) on the pessimistic side and composed by FFT, via Google's dp_accounting
  (`pld.privacy_loss_distribution`); an upper bound on eps at any grid spacing, the tightest
  of the three (`pld_epsilon` has the equations). dp_accounting is an optional dependency:
  without it "pld" is refused in one line naming the package to install.

`calibrate_noise` finds sigma for a target (eps, delta) with
`opacus.accountants.utils.get_noise_multiplier` (doubling, then bisection; it returns the upper
bracket) and then re-checks the answer with `epsilon_spent`, nudging sigma up until
eps_spent <= eps_target holds, so a recorded ledger never claims more privacy than it has.
For "pld" the same search (doubling, bisection, the upper bracket) runs on `pld_epsilon`,
whose every trial sigma is checked by the accountant itself.
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

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fpl_bench.errors import UsageError

__all__ = [
    "ACCOUNTANTS",
    "CALIBRATIONS",
    "EXTRA_RDP_ORDERS",
    "PLD_MAX_EPSILON",
    "PLD_MAX_INTERVAL",
    "PLD_RELATIVE_INTERVAL",
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
    "pld_epsilon",
    "pld_interval",
    "use_calibration_cache",
]

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv", "pld")
CALIBRATIONS: tuple[str, ...] = ("rdp", "prv", "pld", "paper")

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
# The PLD grid spans the privacy losses the composition can reach at spacing Delta, so its
# size grows with eps (at q = 2/3 and 80 steps, one core: eps 48 takes 0.9 s, eps 155 2 s and
# a process peak of 0.9 GB, eps 406 3.4 s and 1.3 GB); targets above this are refused for "pld".
PLD_MAX_EPSILON = 100.0
# PLD spacing Delta = PLD_RELATIVE_INTERVAL x the RDP epsilon at the same sigma, at most
# PLD_MAX_INTERVAL (dp_accounting's default). The answer is an upper bound for every Delta
# (pessimistic connect the dots); its excess over the exact eps shrinks roughly like
# steps x Delta^2 (measured: at 15,700 steps and eps ~ 0.0085 it is 80% at Delta = 1e-4 and 1.2%
# at 1e-5). With Delta = 1e-4 x eps, making Delta ten times finer moves eps by at most 0.10% on
# all 96 settings of the suites, and one evaluation takes 0.02 to 1 s.
PLD_RELATIVE_INTERVAL = 1e-4
PLD_MAX_INTERVAL = 1e-4


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
    `delta`, by the RDP (Mironov 2017; Mironov et al. 2019), PRV (Gopi et al. 2021) or PLD
    (Doroshenko et al. 2022; `pld_epsilon`) accountant.

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
    if accountant == "pld":
        return pld_epsilon(
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta
        )
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    with warnings.catch_warnings():
        if (
            accountant == "prv"
        ):  # its domain sizing runs an RDP accountant that warns about its grid
            warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta, **_accountant_kwargs(accountant)))


def _dp_accounting() -> Any:
    """Google's dp_accounting, or a UsageError saying how to install it (an optional package)."""
    try:
        import dp_accounting
    except ImportError as err:
        raise UsageError(
            "--accountant pld needs Google's dp-accounting: pip install dp-accounting "
            "(fpl-bench depends on it; a partial install lacks it), or use --accountant rdp or prv"
        ) from err
    return dp_accounting


@contextlib.contextmanager
def quiet_absl() -> Iterator[None]:
    """Silence dp_accounting's absl warnings (an RDP order whose series it gives up on)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def pld_interval(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The PLD grid spacing Delta for one setting: `PLD_RELATIVE_INTERVAL` x its RDP epsilon
    (an upper bound on the true one, cheap), at most `PLD_MAX_INTERVAL`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus: "optimal order is the largest alpha"
        eps = epsilon_spent(
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta
        )
    return min(PLD_MAX_INTERVAL, PLD_RELATIVE_INTERVAL * eps)


def pld_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """eps of `steps` Poisson-subsampled Gaussian steps at `delta` from the privacy loss
    distribution, an upper bound (use `epsilon_spent(accountant="pld")`, which settles the
    degenerate cases and memoises).

    One step (sensitivity 1 after clipping, add/remove-one neighbours) is the pair
    P = (1 - q) N(0, sigma^2) + q N(1, sigma^2) and Q = N(0, sigma^2), and Q, P for the other
    direction. Its privacy loss distribution (Koskela, Jalko, Honkela 2020, arXiv 1906.03049,
    Sec. 3) is the law omega of L(x) = log(P(x) / Q(x)) with x ~ P; composing steps convolves
    it: omega_T = omega * ... * omega (T times, by FFT); and the hockey-stick divergence reads

        delta(eps) = E_{Y ~ omega_T}[(1 - e^(eps - Y))_+] + omega_T({inf}),

    eps(delta) = min{eps : delta(eps) <= delta}, the larger over the two directions.
    The loss is put on the grid {i Delta} by connect the dots (Doroshenko, Ghazi, Kamath,
    Kumar, Manurangsi 2022, arXiv 2207.04380, Alg. 1 / Thm. 3.2): the discrete PLD's
    delta(eps) is the linear interpolation, in e^eps, of the true one at the grid points,
    which lies above it (delta(eps) is convex in e^eps), so the pair it describes dominates
    (P, Q) and every eps read off it is an upper bound; mass truncated from the tails (below
    e^-50 per step, 1e-15 in the composition) is moved to +inf, pessimistically.
    Delta = `pld_interval`: 1e-4 x the RDP eps at this sigma, at most 1e-4.
    dp_accounting's `from_gaussian_mechanism(pessimistic_estimate=True,
    use_connect_dots=True)`, `self_compose` and `get_epsilon_for_delta` do the arithmetic.
    """
    dpa = _dp_accounting()
    interval = pld_interval(
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta
    )
    with quiet_absl():
        one_step = dpa.pld.privacy_loss_distribution.from_gaussian_mechanism(
            standard_deviation=float(noise_multiplier),
            sensitivity=1.0,
            sampling_prob=float(sample_rate),
            value_discretization_interval=interval,
            pessimistic_estimate=True,
            use_connect_dots=True,
            neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
        )
        composed = one_step.self_compose(int(steps)) if steps > 1 else one_step
        return float(composed.get_epsilon_for_delta(float(delta)))


_CACHE_DIR: list[Path] = []  # where calibrated sigmas are kept on disk (use_calibration_cache)


def use_calibration_cache(directory: Path | None) -> None:
    """Keep every calibrated sigma in `directory` (one small JSON file per setting) so that
    worker processes and later jobs skip the search (Opacus' RDP series at a large sampling rate
    takes ~20 s per setting on a laptop core); None turns the disk cache off. A stored sigma is
    used only if its file names exactly this setting and the accountant confirms that it meets
    the target; anything else (a corrupt, stale or edited file) is searched again."""
    _CACHE_DIR[:] = [] if directory is None else [Path(directory)]


def _cache_key(**setting: Any) -> dict[str, Any]:
    """What a stored sigma depends on: the setting, Opacus (its RDP also sets PLD's grid), the
    orders and the bump; for "pld" also dp_accounting's version, the grid rule and the search
    (so a sigma found by another rule or library version is searched again)."""
    key = {
        "format": 1,
        "opacus": version("opacus"),
        "orders": list(RDP_ORDERS),
        "bump": _BUMP,
        **setting,
    }
    if setting.get("accountant") == "pld":
        try:
            library = version("dp-accounting")
        except PackageNotFoundError:
            library = "absent"  # refused by `pld_epsilon` before anything is stored
        key |= {
            "dp_accounting": library,
            "pld_interval": [PLD_RELATIVE_INTERVAL, PLD_MAX_INTERVAL],
            "search": "bisect-upper",
        }
    return key


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
    `PRV_MAX_EPSILON` for "prv", `PLD_MAX_EPSILON` for "pld"."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # at so little noise the best RDP order is the smallest
        spent = epsilon_spent(
            noise_multiplier=SIGMA_FLOOR, sample_rate=sample_rate, steps=steps, delta=delta
        )
    cap = {"prv": PRV_MAX_EPSILON, "pld": PLD_MAX_EPSILON}.get(accountant, math.inf)
    return min(spent, cap)


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
    if accountant == "prv" and largest == PRV_MAX_EPSILON:
        why = f"is above {PRV_MAX_EPSILON:g}, where the prv accountant overflows"
    elif accountant == "pld" and largest == PLD_MAX_EPSILON:
        why = f"is above {PLD_MAX_EPSILON:g}, where the pld accountant's grid grows too large"
    else:
        why = f"needs a noise multiplier below {SIGMA_FLOOR} (no meaningful privacy)"
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
    "pld" (not an Opacus accountant) runs the same search here (`_bisect_sigma`): doubling from
    1, halving while the lower end meets the target too, bisection to the tolerance; every
    bracket end is a `pld_epsilon` evaluation, so the upper one returned meets the target.
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
    search = _bisect_sigma if accountant == "pld" else _search_sigma
    sigma = search(meets, epsilon_tolerance=epsilon_tolerance, **meets.keywords)
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


_MAX_SIGMA = 1e6  # Opacus' `get_noise_multiplier` gives up above it too


def _bisect_sigma(
    meets: Callable[[float], bool],
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    epsilon_tolerance: float,
) -> float:
    """The search of `calibrate_noise` for an accountant Opacus does not have: an upper end
    `high` that meets the target (doubling from 1; UsageError above `_MAX_SIGMA`) and a lower
    end `low` that does not (halving, not below `SIGMA_FLOOR`), then bisection until
    eps(high) is within min(epsilon_tolerance, 1% of the target) below the target or the
    bracket is 1e-6 of sigma wide. Returns `high`, which meets the target."""
    tolerance = min(epsilon_tolerance, 0.01 * target_epsilon)

    def spent(sigma: float) -> float:
        return epsilon_spent(
            noise_multiplier=sigma,
            sample_rate=sample_rate,
            steps=steps,
            delta=target_delta,
            accountant=accountant,
        )

    high = 1.0
    while not meets(high):
        high *= 2
        if high > _MAX_SIGMA:
            raise UsageError(
                f"no noise multiplier up to {_MAX_SIGMA:g} meets eps={target_epsilon}, "
                f"delta={target_delta}, sample rate {sample_rate:.4g}, {steps} noisy steps, "
                f"accountant {accountant}; raise --eps or --delta, or train fewer steps"
            )
    low = high / 2
    while low > SIGMA_FLOOR and meets(low):
        high, low = low, max(SIGMA_FLOOR, low / 2)
    if low <= SIGMA_FLOOR and meets(low):
        return low
    while target_epsilon - spent(high) > tolerance and high - low > 1e-6 * high:
        mid = (low + high) / 2
        if meets(mid):
            high = mid
        else:
            low = mid
    return high


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
    calibration: str  # "rdp" | "prv" | "pld" | "paper"
    accountant: str  # accountant that computed eps_spent: "rdp" | "prv" | "pld"
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

    calibration "rdp"/"prv"/"pld": `calibrate_noise` with that accountant, eps_spent from the same
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
