"""Cross-check of the privacy accountants on the settings the shipped suites use.

What is compared. A DP run here is `steps` Poisson-subsampled Gaussian steps (rate q, noise
multiplier sigma, add/remove-one neighbours; privacy/mechanism.py) accounted at `delta`
(privacy/accountant.py). For one such (q, sigma, steps, delta) `crosscheck` computes four
epsilons, two of each kind:

    kind RDP        opacus_rdp   ours, `accountant.epsilon_spent(accountant="rdp")`: Opacus' RDP
                                 analysis over `accountant.RDP_ORDERS`
                    google_rdp   Google's dp_accounting `rdp.RdpAccountant`, the same orders
    kind numerical  opacus_prv   Opacus' PRV accountant (its point estimate; see below)
                    google_pld   dp_accounting `pld.PLDAccountant` (connect the dots, pessimistic)

and, for `--accountant pld` (accountant.py `pld_epsilon`, the same library's PLD built
directly on the same grid), project_pld, which must agree with google_pld within the tolerance.

The math, one line each (mu0 = N(0, sigma^2), mu1 = N(1, sigma^2), mu = (1 - q) mu0 + q mu1):

- RDP (Mironov 2017, arXiv 1702.07476; the sampled Gaussian: Mironov, Talwar, Zhang 2019,
  arXiv 1908.10530): R(a) = steps / (a - 1) * log E_{z~mu0}[(mu(z) / mu0(z))^a], and
  eps = min_a R(a) + log((a - 1) / a) - (log delta + log a) / (a - 1) over the orders a (Balle
  et al. 2020, arXiv 1905.09982, Thm. 21, the form dp_accounting cites from Canonne, Kamath,
  Steinke 2020; both libraries use it).
- PRV (Koskela, Jalko, Honkela 2020, arXiv 1906.03049; Gopi, Lee, Wutschitz 2021, arXiv
  2106.02848): the privacy loss Y = log(mu(z) / mu0(z)), z ~ mu, is discretised on a truncated
  grid, its `steps`-fold sum is composed by FFT and eps solves delta = E[(1 - e^(eps - Y_sum))+];
  Opacus returns estimate +- eps_error.
- PLD (Doroshenko, Ghazi, Kamath, Kumar, Manurangsi 2022, "Connect the Dots: Tighter Discrete
  Approximations of Privacy Loss Distributions", arXiv 2207.04380): the same privacy loss
  distribution, discretised with spacing Delta by the connect-the-dots rule (a dominating pair,
  so an upper bound for every Delta), self-composed by FFT, eps read off delta(eps).

The tolerance rule (`disagreements`): two accountants of the same kind agree within
`TOLERANCE` = 1% relative, |a - b| / min(a, b) <= 0.01; and a numerical accountant, nearly exact,
is not above RDP by more than 1% (RDP's conversion is only an upper bound on the true eps).

The two RDP accountants evaluate the same formula on the same orders: they differ only by the
series each uses for the fractional orders. Opacus' PRV accountant reports
estimate + eps_error as its guarantee; at the error it uses by default (0.01 absolute, what
`epsilon_spent(accountant="prv")` certifies; kept here as `project_prv`) that margin is 2% of
eps = 0.5 and 10% of eps = 0.1, so comparing that bound with PLD would only measure the margin.
The numerical comparison therefore uses Opacus' estimate, computed with eps_error =
`PRV_RELATIVE_ERROR` (5%) of the RDP epsilon (measured: the estimate is then within 0.1% of PLD
on the suites' settings, while its grid stays small); its error interval is returned too
(`opacus_prv_lower` / `opacus_prv_upper`). Opacus' domain is at least [-3, 3] whatever eps is,
so its grid grows like sqrt(steps) / eps; where it would exceed `PRV_MAX_POINTS` points (about
250 bytes each), eps_error is raised until it fits (`prv_eps_error` says which was used).

Suites (`suite_settings`): the (q, sigma, steps, delta) of every private cell of the shipped
suites, derived the way a run derives them (`prepare.partition_clients`, the run's client
schedule and `planning.client_budgets`, one sigma per run by `planning.plan_for_clients`). The
clients' training-set sizes need the data: the synthetic source is generated (exact); a dataset
on disk is read when `data_root` is given (exact); otherwise the sizes come from the dataset
card (`SuiteSetting.sizes`): "card" spreads the card's `train_images` evenly over its classes
(exact for CIFAR-10/100, whose train split minus the 10% per-class holdout is balanced; only
an approximation for CoOp's datasets, whose classes differ in size: a real client's q, steps
and so the run's sigma differ from these), "shots" assumes every class of every domain has at least `shots` training images (the
few-shot domain suites: exact when that holds).

    >>> round(dp_accounting_epsilon(1.0, 0.01, 1000, 1e-5, "rdp"), 3)
    2.101
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from fpl_bench.errors import UsageError
from fpl_bench.privacy.accountant import (
    PLD_MAX_INTERVAL,
    PLD_RELATIVE_INTERVAL,
    RDP_ORDERS,
    epsilon_spent,
    quiet_absl,
)
from fpl_bench.privacy.accountant import pld_interval as _pld_interval

if TYPE_CHECKING:
    from fpl_bench.data.catalog import DatasetCard
    from fpl_bench.data.imageset import Splits
    from fpl_bench.spec import ExperimentSpec

__all__ = [
    "PLD_MAX_INTERVAL",
    "PLD_RELATIVE_INTERVAL",
    "PRV_MAX_POINTS",
    "PRV_RELATIVE_ERROR",
    "TOLERANCE",
    "SuiteSetting",
    "crosscheck",
    "disagreements",
    "dp_accounting_epsilon",
    "opacus_prv_interval",
    "pld_interval",
    "relative_gap",
    "suite_settings",
]

TOLERANCE = 0.01

# Opacus' PRV eps_error as a fraction of the RDP epsilon (an upper bound on the true one), and
# the largest grid it may use: Opacus' discretisation and FFT peak at ~250 bytes a point, so
# 2^22 points take ~1 GB (the suites' largest grid at 5% is 5.6M points: 15,700 steps at
# eps 0.01, where eps_error becomes ~7%; the estimate stays within 0.1% of PLD at 10%).
PRV_RELATIVE_ERROR = 0.05
PRV_MAX_POINTS = 2**22

Kind = Literal["rdp", "pld"]


def _dp_accounting() -> Any:
    try:
        import dp_accounting
    except ImportError as err:  # a dependency; absent only from a broken or partial install
        raise UsageError(
            "the accountant cross-check needs Google's dp-accounting: pip install dp-accounting "
            "(fpl-bench depends on it; a partial install lacks it)"
        ) from err
    return dp_accounting


def _check_setting(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> None:
    if steps < 0 or not 0 <= sample_rate <= 1 or noise_multiplier < 0 or not 0 < delta < 1:
        raise ValueError(
            f"bad accounting input: sigma={noise_multiplier}, q={sample_rate}, "
            f"steps={steps}, delta={delta}"
        )


def _degenerate(noise_multiplier: float, sample_rate: float, steps: int) -> float | None:
    """eps of the cases every accountant agrees on: nothing spent, or no noise."""
    if steps == 0 or sample_rate == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    return None


def _rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus: "optimal order is the largest alpha"
        return epsilon_spent(
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta
        )


def pld_interval(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The PLD spacing Delta used for this setting: `PLD_RELATIVE_INTERVAL` x the RDP epsilon,
    at most `PLD_MAX_INTERVAL` (accountant.py `pld_interval`, the same grid as
    `--accountant pld`; the constants' comment there says why)."""
    return _pld_interval(
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta
    )


def dp_accounting_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    kind: Kind = "rdp",
    *,
    value_discretization_interval: float | None = None,
) -> float:
    """eps of `steps` Poisson-subsampled Gaussian steps at `delta` by Google's dp_accounting.

    The event is SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)
    under add/remove-one neighbours (both accountants' default, and Opacus' relation).
    kind "rdp": `RdpAccountant` over our orders, `accountant.RDP_ORDERS` (Opacus' default grid
    1.1 .. 10.9 by 0.1 and 12 .. 63, plus `EXTRA_RDP_ORDERS` 64 .. 1024), so that the two RDP
    figures minimise over the same candidates (dp_accounting's own default grid also has 11
    and lacks 64 .. 127 and the orders between 128 and 1024). Where dp_accounting's series
    for a fractional order does not converge in 1000 terms (large q, e.g. q = 0.5) it drops
    that order (a logged warning, silenced here), which can only raise its epsilon; Opacus
    sums until convergence.
    kind "pld": `PLDAccountant` with spacing `value_discretization_interval`, by default
    `pld_interval` (1e-4 x the RDP epsilon, at most 1e-4; see `PLD_RELATIVE_INTERVAL`).
    """
    if kind not in ("rdp", "pld"):
        raise ValueError(f"kind must be 'rdp' or 'pld', got {kind!r}")
    _check_setting(noise_multiplier, sample_rate, steps, delta)
    fixed = _degenerate(noise_multiplier, sample_rate, steps)
    if fixed is not None:
        return fixed
    dpa = _dp_accounting()
    event = dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(float(sample_rate), dpa.GaussianDpEvent(float(noise_multiplier))),
        int(steps),
    )
    if kind == "rdp":
        accountant = dpa.rdp.RdpAccountant(orders=list(RDP_ORDERS))
    else:
        interval = value_discretization_interval or pld_interval(
            noise_multiplier, sample_rate, steps, delta
        )
        accountant = dpa.pld.PLDAccountant(value_discretization_interval=interval)
    with quiet_absl():
        accountant.compose(event)
        return float(accountant.get_epsilon(delta))


def _prv_domain(prv: Any, steps: int, eps_error: float, delta_error: float) -> Any:
    """Opacus' grid for one PRV self-composed `steps` times (PRVAccountant._get_domain)."""
    from opacus.accountants.analysis.prv import Domain, compute_safe_domain_size

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its RDP-based sizing warns about its order grid
        half = compute_safe_domain_size(
            prvs=[prv],
            max_self_compositions=[steps],
            eps_error=eps_error,
            delta_error=delta_error,
        )
    mesh = eps_error / math.sqrt(steps * math.log(12 / delta_error) / 2)
    return Domain.create_aligned(-half, half, mesh)


def opacus_prv_interval(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    *,
    eps_error: float,
    delta_error: float | None = None,
    max_points: int | None = PRV_MAX_POINTS,
) -> tuple[float, float, float, float]:
    """(lower, estimate, upper, eps_error used) of Opacus' PRV accountant.

    The steps of `opacus.accountants.PRVAccountant.get_epsilon` (which returns `upper`), on
    Opacus' public PRV analysis functions: the same domain, mesh
    eps_error / sqrt(steps log(12 / delta_error) / 2), discretisation and FFT composition,
    delta_error = delta / 1000 by default. If the grid would hold more than `max_points`
    points (None: no cap), eps_error is raised until it fits, and the value used is returned.
    """
    from opacus.accountants.analysis.prv import (
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        discretize,
    )

    _check_setting(noise_multiplier, sample_rate, steps, delta)
    fixed = _degenerate(noise_multiplier, sample_rate, steps)
    if fixed is not None:
        return fixed, fixed, fixed, eps_error
    if delta_error is None:
        delta_error = delta / 1000
    prv = PoissonSubsampledGaussianPRV(float(sample_rate), float(noise_multiplier))
    domain = _prv_domain(prv, int(steps), eps_error, delta_error)
    while max_points is not None and domain.size > max_points:
        eps_error *= 1.05 * domain.size / max_points
        domain = _prv_domain(prv, int(steps), eps_error, delta_error)
    with np.errstate(divide="ignore"):  # q = 1: Opacus takes log(1 - q) = -inf, as meant
        truncated = TruncatedPrivacyRandomVariable(prv, domain.t_min, domain.t_max)
        composed = compose_heterogeneous(
            dprvs=[discretize(truncated, domain)], num_self_compositions=[int(steps)]
        )
        lower, estimate, upper = composed.compute_epsilon(delta, delta_error, eps_error)
    return float(lower), float(estimate), float(upper), float(eps_error)


def relative_gap(a: float, b: float) -> float:
    """|a - b| / min(a, b): the disagreement of two epsilons (0 when both are 0 or both inf)."""
    if a == b:
        return 0.0
    low = min(a, b)
    return math.inf if low <= 0 or math.isinf(max(a, b)) else abs(a - b) / low


@functools.lru_cache(maxsize=1024)
def _crosscheck(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float
) -> tuple[tuple[str, float], ...]:
    rdp = _rdp_epsilon(noise_multiplier, sample_rate, steps, delta)
    google_rdp = dp_accounting_epsilon(noise_multiplier, sample_rate, steps, delta, "rdp")
    interval = pld_interval(noise_multiplier, sample_rate, steps, delta)
    pld = dp_accounting_epsilon(
        noise_multiplier,
        sample_rate,
        steps,
        delta,
        "pld",
        value_discretization_interval=interval,
    )
    lower, estimate, upper, used = opacus_prv_interval(
        noise_multiplier,
        sample_rate,
        steps,
        delta,
        eps_error=PRV_RELATIVE_ERROR * rdp if math.isfinite(rdp) else 0.01,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        project_prv, project_pld = (
            epsilon_spent(
                noise_multiplier=noise_multiplier,
                sample_rate=sample_rate,
                steps=steps,
                delta=delta,
                accountant=name,
            )
            for name in ("prv", "pld")
        )
    return (
        ("opacus_rdp", rdp),
        ("google_rdp", google_rdp),
        ("opacus_prv", estimate),
        ("google_pld", pld),
        ("rdp_gap", relative_gap(rdp, google_rdp)),
        ("numerical_gap", relative_gap(estimate, pld)),
        ("pld_saving", 1.0 - pld / rdp if rdp > 0 and math.isfinite(rdp) else 0.0),
        ("opacus_prv_lower", lower),
        ("opacus_prv_upper", upper),
        ("prv_eps_error", used),
        ("pld_interval", interval),
        ("project_prv", project_prv),
        ("project_pld", project_pld),
    )


def crosscheck(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float
) -> dict[str, float]:
    """The four epsilons of one setting and the disagreement within each kind.

    Keys: opacus_rdp (ours, `epsilon_spent`), google_rdp, opacus_prv (Opacus' PRV estimate),
    google_pld; rdp_gap = relative_gap(opacus_rdp, google_rdp), numerical_gap =
    relative_gap(opacus_prv, google_pld); pld_saving = 1 - google_pld / opacus_rdp (how much
    smaller PLD's epsilon is than ours at this sigma); opacus_prv_lower / opacus_prv_upper
    (Opacus' interval, upper = its guarantee at prv_eps_error), prv_eps_error, pld_interval
    (Delta), project_prv (what `epsilon_spent(accountant="prv")` certifies, eps_error 0.01),
    project_pld (what `--accountant pld` certifies: `accountant.pld_epsilon`, dp_accounting's
    PLD built directly rather than through its `PLDAccountant`, on the same grid).
    Memoised per setting (a fresh dict each call).
    """
    _check_setting(noise_multiplier, sample_rate, steps, delta)
    if _degenerate(noise_multiplier, sample_rate, steps) is not None:
        raise ValueError("nothing to cross-check: no steps, q = 0 or sigma = 0")
    return dict(_crosscheck(float(noise_multiplier), float(sample_rate), int(steps), float(delta)))


def disagreements(result: dict[str, float], tolerance: float = TOLERANCE) -> list[str]:
    """The rules of the module docstring that `crosscheck`'s `result` breaks, one line each."""
    broken = []
    if result["rdp_gap"] > tolerance:
        broken.append(
            f"RDP: opacus {result['opacus_rdp']:.6g} vs google {result['google_rdp']:.6g} "
            f"differ by {result['rdp_gap']:.2%}"
        )
    if result["numerical_gap"] > tolerance:
        broken.append(
            f"numerical: opacus PRV {result['opacus_prv']:.6g} vs google PLD "
            f"{result['google_pld']:.6g} differ by {result['numerical_gap']:.2%}"
        )
    if relative_gap(result["project_pld"], result["google_pld"]) > tolerance:
        broken.append(
            f"PLD: --accountant pld {result['project_pld']:.6g} vs google PLDAccountant "
            f"{result['google_pld']:.6g} differ by "
            f"{relative_gap(result['project_pld'], result['google_pld']):.2%}"
        )
    rdp = min(result["opacus_rdp"], result["google_rdp"])
    for name in ("opacus_prv", "google_pld"):
        if result[name] > rdp * (1 + tolerance):
            broken.append(f"{name} {result[name]:.6g} is above RDP {rdp:.6g} by more than 1%")
    return broken


# ---------------------------------------------------------------------- suites' settings


@dataclass(frozen=True)
class SuiteSetting:
    """One distinct (q, sigma, steps, delta) that suites' runs account, and where it is used.

    `uses`: "suite/dataset eps=E seed=S" of each run, plus " client" when the setting is a
    client other than the one the run's ledger records (`every_client`). `eps_targets`: the
    targets of those runs. `sizes`: where the clients' sizes came from ("data": loaded or
    generated; "card": the card's train_images over its classes; "shots": shots per class and
    domain; see the module docstring).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    eps_targets: tuple[float, ...]
    calibration: str
    sizes: str
    uses: tuple[str, ...]

    @property
    def key(self) -> tuple[float, float, int, float]:
        return (self.noise_multiplier, self.sample_rate, self.steps, self.delta)


def suite_settings(
    suites: Iterable[str] | None = None,
    *,
    every_client: bool = False,
    data_root: Path | None = None,
    cache_dir: Path | None = None,
    seeds: Iterable[int] | None = None,
) -> list[SuiteSetting]:
    """The distinct (q, sigma, steps, delta) of the private cells of `suites` (None: every
    shipped suite), in the order first met; `seeds` keeps only those seeds' cells (None: all).

    Per grid, dataset and seed: the clients' split (`prepare.partition_clients`, on the
    data or on the card's sizes: see the module docstring), their (q, noisy steps) over the
    run's client schedule (`prepare.run_budgets`, i.e. `FederatedRun.budget`), and per target
    eps the run's one sigma (`planning.plan_for_clients` with the suite's accountant). A run's
    setting is the client its ledger records (the largest epsilon); `every_client` adds the
    other clients' (q, steps) at the same sigma. Cells with eps none, and grids none of whose
    methods train, have none. `data_root` reads datasets from disk (exact sizes);
    `cache_dir` (default: the spec's) holds the generated synthetic data.
    Calibrating sigma is the slow part (seconds per (q, steps) pair; the CIFAR-100 table has
    25 and 50 clients): `accountant.use_calibration_cache` keeps the answers on disk.
    """
    from fpl_bench.suite import list_suites, load_suite, suite_cells

    keep = None if seeds is None else set(seeds)
    found: dict[tuple[float, float, int, float], SuiteSetting] = {}
    for name in list(suites) if suites is not None else list_suites():
        suite = load_suite(name)
        for spec in _private_specs(suite_cells(suite)):
            splits, sizes = _client_pool(spec, data_root=data_root, cache_dir=cache_dir)
            for seed in (s for s in spec.seeds if keep is None or s in keep):
                for eps, ledger, pairs in _run_plans(spec, splits, seed):
                    where = f"{suite.name}/{spec.dataset} eps={eps:g} seed={seed}"
                    recorded = (ledger.sample_rate, ledger.steps)
                    chosen = pairs if every_client else [recorded]
                    for q, steps in chosen:
                        use = where if (q, steps) == recorded else f"{where} client"
                        setting = SuiteSetting(
                            noise_multiplier=ledger.noise_multiplier,
                            sample_rate=q,
                            steps=steps,
                            delta=ledger.delta,
                            eps_targets=(float(eps),),
                            calibration=ledger.calibration,
                            sizes=sizes,
                            uses=(use,),
                        )
                        _merge(found, setting)
    return list(found.values())


def _merge(found: dict[tuple[float, float, int, float], SuiteSetting], new: SuiteSetting) -> None:
    old = found.get(new.key)
    if old is None:
        found[new.key] = new
        return
    found[new.key] = SuiteSetting(
        *new.key,
        eps_targets=tuple(dict.fromkeys(old.eps_targets + new.eps_targets)),
        calibration=old.calibration,
        sizes=old.sizes if old.sizes == new.sizes else f"{old.sizes}+{new.sizes}",
        uses=old.uses + new.uses,
    )


def _private_specs(cells: Sequence[Any]) -> list[ExperimentSpec]:
    """One spec per (grid, dataset) that has a private cell of a method that trains."""
    from fpl_bench.learners import LEARNERS

    specs: dict[tuple[int, str], ExperimentSpec] = {}
    for cell in cells:
        trains = LEARNERS.get(cell.method.learner).trains
        if cell.eps is not None and trains:
            specs.setdefault((cell.grid, cell.dataset), cell.spec)
    return list(specs.values())


def _run_plans(spec: ExperimentSpec, splits: Splits, seed: int) -> list[tuple[float, Any, list]]:
    """(eps, ledger, distinct (q, steps) of its clients) per private eps of one seed's runs,
    as `prepare.prepare` and `experiment.plan_run_privacy` compute them."""
    from fpl_bench.prepare import partition_clients, poolings, run_budgets
    from fpl_bench.privacy.planning import check_delta

    _, split = partition_clients(spec, splits, seed)
    check_delta(spec.delta, [len(idx) for idx in split.train])
    plans = []
    for pooled in poolings(spec):
        plans.extend(_eps_plans(spec, run_budgets(spec, split, seed, pooled=pooled)))
    return plans


def _eps_plans(spec: ExperimentSpec, budgets: list) -> list[tuple[float, Any, list]]:
    """(eps, ledger, distinct (q, steps)) per private eps of one grouping's budgets."""
    from fpl_bench.privacy.planning import plan_for_clients

    pairs = sorted({(q, steps) for q, steps in budgets if steps > 0})
    plans = []
    for eps in (e for e in spec.eps if e is not None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus' order-grid warnings at tiny eps
            ledger = plan_for_clients(
                budgets,
                eps=eps,
                delta=spec.delta,
                clip_norm=spec.clip_norm,
                rounds=spec.rounds,
                calibration=spec.accountant,
            )
        plans.append((eps, ledger, pairs))
    return plans


def _client_pool(
    spec: ExperimentSpec, *, data_root: Path | None, cache_dir: Path | None
) -> tuple[Splits, str]:
    """The splits the clients are dealt from, and where their sizes come from."""
    from fpl_bench.cards import dataset_card
    from fpl_bench.data.sources import load_source

    card = dataset_card(spec.dataset_source())
    root = data_root if data_root is not None else spec.data_root
    if card.kind == "synthetic" or root is not None:
        splits = load_source(
            card,
            root=root,
            options=spec.dataset_options,
            cache_dir=Path(cache_dir) if cache_dir is not None else spec.cache_dir,
        )
        return splits, "data"
    return _stand_in(card, spec)


def _stand_in(card: DatasetCard, spec: ExperimentSpec) -> tuple[Splits, str]:
    """Labels (and domains) with the card's sizes, for a dataset that is not on this machine:
    "card" = train_images spread evenly over the classes (one domain), "shots" = `shots`
    images per class and domain. One test image per class and domain (the partitioners cut
    the train counts before they look at the test set)."""
    from fpl_bench.data.imageset import ImageSet, Splits

    where = f"{spec.dataset}: its clients' sizes"
    if spec.dataset_options:
        raise UsageError(
            f"{where} need the data when dataset options are set "
            f"({spec.dataset_options}); pass data_root"
        )
    if card.classes is None:
        raise UsageError(f"{where} need the data (the card does not give its classes)")
    domains = tuple(getattr(card.source, "domains", ("default",)))
    classes = int(card.classes)
    if card.train_images is not None and len(domains) == 1:
        per_class = [len(c) for c in np.array_split(np.arange(card.train_images), classes)]
        sizes = "card"
    elif spec.shots > 0:
        per_class = [spec.shots] * classes
        sizes = "shots"
    else:
        raise UsageError(
            f"{where} need the data: shots = 0 (every image) and the card gives no per-domain "
            "sizes; pass data_root"
        )
    train_labels = np.tile(np.repeat(np.arange(classes), per_class), len(domains))
    train_domains = np.repeat(np.arange(len(domains)), sum(per_class))
    test_labels = np.tile(np.arange(classes), len(domains))
    test_domains = np.repeat(np.arange(len(domains)), classes)

    def images(labels: np.ndarray, doms: np.ndarray) -> ImageSet:
        pixels = np.zeros((labels.size, 1, 1, 3), np.uint8)
        return ImageSet(images=pixels, labels=labels, domains=doms)

    test = images(test_labels, test_domains)
    splits = Splits(
        classnames=tuple(f"class{c}" for c in range(classes)),
        train=images(train_labels, train_domains),
        val=test,
        test=test,
        fingerprint=f"stand-in:{card.name}:{sizes}",
        domain_names=domains,
    )
    return splits, sizes
