"""White-box one-run canary audit of DP-SGD as fpl-bench runs it (parameter space).

Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023, arXiv
2305.08846), the white-box setting of its experiments: the auditor inserts gradient canaries
and reads the model's parameters; `privacy/audit_bound.py` turns its guesses into an epsilon
lower bound.

Canaries. u_1, ..., u_m are the paper's Dirac canaries: unit vectors on m distinct random
coordinates of R^d, d >= m (`canary_directions`). The noise is isotropic, so any orthonormal
random directions give the same audit in distribution (clipping, sums and the noise commute
with rotations). Canary j is a training example of the target client whose gradient is M u_j
at every step, M = `canary_norm` >= C, whatever the parameters; S_j ~ Bernoulli(1/2)
independently says whether it is in the training set. The client's other `background`
examples have gradient 0, the strongest background for this attacker: under per-sample
clipping a background example adds its clipped gradient to the sum whether or not a canary is
there, so a random one only adds variance to the scores and a fixed one a constant the
attacker subtracts; a zero one still counts in the realised batch size, which the
batch-clipping variant below divides by.

One step (Abadi et al. 2016, Alg. 1; `privacy/mechanism.py`). Each example is in the batch
with probability q (Poisson); I_t is the set of sampled canaries, n = background + sum_j S_j
the client's examples and E[B] = q n. The client's clipped sum and the noisy step gradient are

    s_t = sum_{j in I_t} clip_C(M u_j) = C sum_{j in I_t} u_j                (`clipped_sum`)
    o_t = (s_t + N(0, sigma^2 C^2 I)) / E[B]                                  (`noisy_mean`)

with sigma calibrated by `accountant.calibrate_noise` for (eps, delta, q, T), as the driver's
plan does. Where the noise goes and who sees what follows `privacy/placement.py`:

    trust "client": the client noises o_t itself and the server, the attacker, sees every o_t
        of the target client (its view: T rows). Under round synchronisation it would see only
        per-round sums of them, which the linear score below cannot tell apart.
    trust "server": the clients send s_t; the server adds one draw N(0, sigma^2 C^2 I) to
        the sum over the K clients and divides by their total expected batch K E[B] (clients
        of equal size; the other K - 1 send zero sums, the strongest background). The attacker
        reads the released prompt. SGD with momentum beta from a public start p_0 releases
        p_T = p_0 - lr sum_t w_t o_t, w_t = (1 - beta^(T - t)) / (1 - beta) for t = 0..T-1,
        so its view is the one row D = (p_0 - p_T) / lr = sum_t w_t o_t (constant lr).

Score and guesses. The attacker projects its view on each canary direction, in units of C:

    score_j = (E / C) sum_rows <row, u_j>                                    (`canary_scores`)

(E the expected batch the rows were divided by; w_t = 1 in the client view). For the correct
mechanism score_j = sum_t w_t ([j in I_t] + sigma z_tj), z_tj iid N(0, 1): included canaries
are shifted by about q sum_t w_t, held-out ones are not. `audit_bound.best_epsilon_lower_bound`
guesses "in" for the k highest scores and "out" for the k lowest over `default_k_grid(m)`
(abstaining on the middle), each k tested at (1 - confidence) / |grid| (Bonferroni), with the
run's delta. The client-trust attacker could also score each step apart (a likelihood ratio
under Poisson sampling); in a trial at the default setting that moved the bounds by about 0.1
either way, and it is not implemented.

Broken mechanisms (TEST-ONLY: `Variant`, never used by the driver), each one small change:

    NO_NOISE           sigma = 0.
    BATCH_CLIP         DP-FPL's reference (linhhtran/DP-FPL, trainers/DP_FPL.py): the gradient
                       of the batch-mean loss, g_bar = (1/B_t) sum_{i in batch} g_i, is clipped
                       to C and noised with std sigma C / E[B] (its sensitivity / max_batch):
                       o_t = clip_C(g_bar) + N(0, sigma^2 C^2 I) / E[B], B_t the realised batch
                       (g_bar = 0 when B_t = 0). One canary in a batch of zero gradients moves
                       g_bar by C, E[B] times the C / E[B] the accountant assumed.
    NOISE_SPLIT        each client adds N(0, sigma^2 C^2 / K) to its clipped sum and nobody else
                       adds noise: the shares add up to sigma C in the sum over K clients, which
                       is sound under "server" trust (the attacker sees only the sum) and off by
                       sqrt(K) in noise under "client" trust (the server sees each upload).
    MISREPORTED_RATE   sigma calibrated for the rate q / `misreport_factor` while sampling at q.

`spent_epsilon` is the accountant's epsilon of the mechanism actually run on the canaries'
data (inf without noise); for the correct mechanism it is at most the target. At the default
`AuditSetting` (m = 1000, d = 1024, T = 200, q = 0.2, K = 16, eps = 2, delta = 1e-5) every
broken variant spends far more than eps = 2 and the audit's lower bound exceeds 2 for each,
while the correct mechanism's stays well below it (docs/audit.md: seeds and margins).

Without noise 99 of the 100 guesses at k = 50 are right (one included canary was never sampled
in 20 steps), which 200 canaries turn into a lower bound of 2.6:

    >>> small = AuditSetting(canaries=200, dim=200, steps=20)
    >>> audit = run_canary_audit(small, Variant.NO_NOISE, "client", seed=0)
    >>> round(audit.bound.epsilon, 2), audit.bound.correct, audit.bound.guesses
    (2.6, 99, 100)

Not covered: input-space (black-box) canaries through the real driver and models, canaries of
a client under partial client sampling, and a learning-rate schedule in the released view.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
from torch import Tensor

from fpl_bench.privacy.accountant import calibrate_noise, epsilon_spent
from fpl_bench.privacy.audit_bound import AuditResult, best_epsilon_lower_bound
from fpl_bench.privacy.mechanism import add_gaussian_noise, clipped_sum, noisy_mean
from fpl_bench.privacy.placement import TRUST_MODELS, Trust

__all__ = [
    "AuditSetting",
    "CanaryAudit",
    "Variant",
    "canary_directions",
    "canary_scores",
    "claimed_noise_multiplier",
    "run_canary_audit",
    "simulate_view",
    "spent_epsilon",
]

PARAM = "prompt"  # the one privatized parameter tensor of the simulation, flattened: [d]


class Variant(Enum):
    """The mechanism audited: CORRECT is fpl-bench's; the others are TEST-ONLY broken
    mechanisms (module docstring) that exist to show that the audit can fail."""

    CORRECT = "correct"
    NO_NOISE = "no_noise"
    BATCH_CLIP = "batch_clip"
    NOISE_SPLIT = "noise_split"
    MISREPORTED_RATE = "misreported_rate"


@dataclass(frozen=True)
class AuditSetting:
    """One audited run: m canaries of one client, d parameters, T noisy steps at Poisson rate q,
    K clients, the target (eps, delta) sigma is calibrated for, and the 95% audit."""

    canaries: int = 1000  # m
    dim: int = 1024  # d, >= m
    steps: int = 200  # T, noisy steps that touch the target client's data
    sample_rate: float = 0.2  # q
    clients: int = 16  # K
    eps: float = 2.0  # target epsilon
    delta: float = 1e-5
    clip_norm: float = 1.0  # C
    background: int = 0  # zero-gradient examples of the target client besides the canaries
    canary_norm: float = 1e6  # M, the canaries' raw gradient norm (>= C; >> C B for BATCH_CLIP)
    momentum: float = 0.9  # beta of the SGD that produces the released prompt (server view)
    misreport_factor: float = 10.0  # MISREPORTED_RATE tells the accountant q / this
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if not 2 <= self.canaries <= self.dim:
            raise ValueError(f"need 2 <= canaries <= dim, got {self.canaries=}, {self.dim=}")
        if self.steps < 1 or self.clients < 1 or self.background < 0:
            raise ValueError(f"need steps, clients >= 1 and background >= 0, got {self}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if not self.canary_norm >= self.clip_norm > 0:
            raise ValueError(f"need canary_norm >= clip_norm > 0, got {self}")
        if not 0 <= self.momentum < 1 or not self.misreport_factor >= 1:
            raise ValueError(f"need 0 <= momentum < 1 and misreport_factor >= 1, got {self}")


@dataclass(frozen=True)
class CanaryAudit:
    """One audit: the mechanism, who looked, the sigma the accountant claimed for the target,
    and the best bound over the k grid (`audit_bound.AuditResult`)."""

    variant: Variant
    trust: Trust
    seed: int
    eps_target: float
    noise_multiplier: float
    bound: AuditResult  # bound.epsilon: the empirical lower bound at the setting's confidence

    @property
    def margin(self) -> float:
        """Lower bound minus target: > 0 means the audit rejects the claimed guarantee."""
        return self.bound.epsilon - self.eps_target


def canary_directions(*, canaries: int, dim: int, generator: torch.Generator) -> Tensor:
    """m Dirac directions u_j = e_{c_j} in R^d, [m, d] float32, on m distinct coordinates c_j
    drawn uniformly at random (Steinke et al.'s white-box canaries)."""
    if not 1 <= canaries <= dim:
        raise ValueError(f"need 1 <= canaries <= dim, got {canaries=}, {dim=}")
    coords = torch.randperm(dim, generator=generator)[:canaries]
    directions = torch.zeros(canaries, dim)
    directions[torch.arange(canaries), coords] = 1.0
    return directions


def claimed_noise_multiplier(setting: AuditSetting, variant: Variant) -> float:
    """sigma the accountant calibrates for (eps, delta, q, T): for q / misreport_factor under
    MISREPORTED_RATE, 0 under NO_NOISE."""
    if variant is Variant.NO_NOISE:
        return 0.0
    rate = setting.sample_rate
    if variant is Variant.MISREPORTED_RATE:
        rate /= setting.misreport_factor
    return calibrate_noise(
        target_epsilon=setting.eps,
        target_delta=setting.delta,
        sample_rate=rate,
        steps=setting.steps,
    )


def spent_epsilon(setting: AuditSetting, variant: Variant, trust: Trust) -> float:
    """The accountant's epsilon of the mechanism actually run, at the sensitivity the canaries
    realise (module docstring): effective noise multiplier sigma, sigma / sqrt(K) (NOISE_SPLIT
    under client trust) or sigma / E[B] (BATCH_CLIP, E[B] at m / 2 included canaries), sampled
    at the true q for T steps; inf without noise."""
    _check_trust(trust)
    sigma = claimed_noise_multiplier(setting, variant)
    if variant is Variant.NOISE_SPLIT and trust == "client":
        sigma /= math.sqrt(setting.clients)
    if variant is Variant.BATCH_CLIP:
        sigma /= setting.sample_rate * (setting.background + setting.canaries / 2)
    with warnings.catch_warnings():
        # at a broken variant's small sigma the best RDP order is the grid's smallest (Opacus
        # warns); the epsilon is then loose upwards, and far above any target either way
        warnings.simplefilter("ignore")
        return epsilon_spent(
            noise_multiplier=sigma,
            sample_rate=setting.sample_rate,
            steps=setting.steps,
            delta=setting.delta,
        )


def _torch_generator(seed: int, stream: int) -> torch.Generator:
    """A torch generator for one stream of the run at `seed` (directions 0, noise 1), seeded
    from numpy's SeedSequence so that the streams are independent."""
    state = np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _check_trust(trust: str) -> None:
    if trust not in TRUST_MODELS:
        raise ValueError(f"unknown trust model {trust!r}; one of {TRUST_MODELS}")


def _clipped_total(
    canary_grads: Tensor,
    *,
    batch_size: int,
    expected_batch: float,
    setting: AuditSetting,
    variant: Variant,
) -> Tensor:
    """The target client's clipped sum s_t, [d]: sum of per-sample clipped gradients, or under
    BATCH_CLIP E[B] clip_C(g_bar) (so that noisy_mean's / E[B] gives the reference's step).
    canary_grads: [b, d], the sampled canaries; the batch's other rows are zero gradients."""
    if variant is not Variant.BATCH_CLIP:
        return clipped_sum({PARAM: canary_grads}, clip_norm=setting.clip_norm)[PARAM]
    if batch_size == 0:
        return torch.zeros(setting.dim)
    batch_mean = canary_grads.sum(0, keepdim=True) / batch_size  # [1, d]
    clipped = clipped_sum({PARAM: batch_mean}, clip_norm=setting.clip_norm)[PARAM]
    return expected_batch * clipped


def _noised_upload(
    total: Tensor,
    *,
    sigma: float,
    setting: AuditSetting,
    variant: Variant,
    trust: Trust,
    expected_batch: float,
    generator: torch.Generator,
) -> Tensor:
    """One step's view row (client trust) or the server's noisy mean (server trust), [d]."""
    clients = setting.clients
    if variant is Variant.NOISE_SPLIT:
        sigma /= math.sqrt(clients)  # each client's share
        if trust == "server":  # K noised uploads, the target's and K - 1 zero sums, added up
            noised = [
                add_gaussian_noise(
                    {PARAM: upload},
                    noise_multiplier=sigma,
                    clip_norm=setting.clip_norm,
                    generator=generator,
                )[PARAM]
                for upload in [total] + [torch.zeros_like(total)] * (clients - 1)
            ]
            return torch.stack(noised).sum(0) / (clients * expected_batch)
    divisor = expected_batch if trust == "client" else clients * expected_batch
    return noisy_mean(
        {PARAM: total},
        noise_multiplier=sigma,
        clip_norm=setting.clip_norm,
        expected_batch=divisor,
        generator=generator,
    )[PARAM]


def simulate_view(
    setting: AuditSetting,
    variant: Variant,
    trust: Trust,
    *,
    noise_multiplier: float,
    directions: Tensor,
    included: np.ndarray,
    seed: int,
) -> tuple[Tensor, float]:
    """(rows [R, d], E) of what the attacker sees when `variant` runs with the claimed sigma
    `noise_multiplier` (`claimed_noise_multiplier`): the target client's T noisy step
    gradients o_t under "client" trust (E = E[B]); the released prompt's displacement
    D = sum_t w_t o_t under "server" trust (one row, E = K E[B]). directions: [m, d];
    included: [m] bool. Sampling is drawn from numpy's generator at `seed`, noise from
    torch's."""
    _check_trust(trust)
    rng = np.random.default_rng([seed, 1])
    noise_gen = _torch_generator(seed, 1)
    sigma = noise_multiplier
    n_examples = setting.background + int(included.sum())
    expected = setting.sample_rate * n_examples  # E[B]
    sampled = (rng.random((setting.steps, setting.canaries)) < setting.sample_rate) & included
    background_in_batch = rng.binomial(setting.background, setting.sample_rate, setting.steps)
    canary_grads = setting.canary_norm * directions  # [m, d]
    rows = []
    for t in range(setting.steps):
        idx = torch.from_numpy(np.flatnonzero(sampled[t]))
        total = _clipped_total(
            canary_grads[idx],
            batch_size=len(idx) + int(background_in_batch[t]),
            expected_batch=expected,
            setting=setting,
            variant=variant,
        )
        rows.append(
            _noised_upload(
                total,
                sigma=sigma,
                setting=setting,
                variant=variant,
                trust=trust,
                expected_batch=expected,
                generator=noise_gen,
            )
        )
    view = torch.stack(rows)  # [T, d]
    if trust == "client":
        return view, expected
    beta = setting.momentum
    remaining = torch.arange(setting.steps, 0, -1, dtype=torch.float64)  # T - t
    weights = ((1 - beta**remaining) / (1 - beta)).to(view.dtype)  # w_t
    return (weights @ view)[None], setting.clients * expected


def canary_scores(
    rows: Tensor, directions: Tensor, *, expected_batch: float, clip_norm: float
) -> np.ndarray:
    """score_j = (E / C) sum_r <rows_r, u_j>, [m] float64: each canary's clipped contributions
    to what the attacker saw, in units of C (module docstring). rows: [R, d]; directions:
    [m, d]."""
    projected = directions.to(torch.float64) @ rows.to(torch.float64).sum(0)  # [m]
    return (projected * (expected_batch / clip_norm)).numpy()


def run_canary_audit(
    setting: AuditSetting, variant: Variant, trust: Trust, *, seed: int
) -> CanaryAudit:
    """Draw the canaries, their inclusion S ~ Bernoulli(1/2)^m and one run at `seed`; score,
    guess and bound (module docstring)."""
    directions = canary_directions(
        canaries=setting.canaries,
        dim=setting.dim,
        generator=_torch_generator(seed, 0),
    )
    included = np.random.default_rng([seed, 0]).random(setting.canaries) < 0.5
    sigma = claimed_noise_multiplier(setting, variant)
    rows, expected = simulate_view(
        setting,
        variant,
        trust,
        noise_multiplier=sigma,
        directions=directions,
        included=included,
        seed=seed,
    )
    scores = canary_scores(rows, directions, expected_batch=expected, clip_norm=setting.clip_norm)
    bound = best_epsilon_lower_bound(scores, included, setting.delta, setting.confidence)
    return CanaryAudit(
        variant=variant,
        trust=trust,
        seed=seed,
        eps_target=setting.eps,
        noise_multiplier=sigma,
        bound=bound,
    )
