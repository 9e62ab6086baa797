"""Privacy planning: one noise multiplier for every client of a run (pure functions).

A client's data is touched by `steps` noisy steps with Poisson rate q = min(1, B / n) each
(B the expected batch size, n its training examples; sizes are public). Clients differ in
(q, steps) when their datasets differ or when client sampling (fraction < 1) picks some more
often. One sigma is used by all (the server adds ONE noise draw to the sum over clients, so the
clients of a step must share it), calibrated for the client that needs the most noise; every
client's epsilon is then at most the target, and the ledger reports the largest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from fpl_bench.errors import UsageError
from fpl_bench.privacy.accountant import (
    PrivacyLedger,
    check_supported_epsilon,
    epsilon_spent,
    plan_privacy,
)


def sample_rate(n_train: int, batch_size: int) -> float:
    """Poisson sampling rate q = B / n (capped at 1)."""
    return min(1.0, batch_size / n_train)


def steps_per_round(n_train: int, *, batch_size: int, local_epochs: int) -> int:
    """Local steps of one client in one round: local_epochs x ceil(n / B)."""
    return local_epochs * max(1, math.ceil(n_train / batch_size))


def client_budgets(
    n_train: Sequence[int],
    *,
    batch_size: int,
    local_epochs: int,
    schedule: Sequence[Sequence[int]],
) -> list[tuple[float, int]]:
    """(q, noisy steps over the run) per client; `schedule` = the clients sampled per round."""
    rounds_in = [sum(c in r for r in schedule) for c in range(len(n_train))]
    return [
        (
            sample_rate(n, batch_size),
            rounds_in[c] * steps_per_round(n, batch_size=batch_size, local_epochs=local_epochs),
        )
        for c, n in enumerate(n_train)
    ]


def check_delta(delta: float, n_train: Sequence[int]) -> None:
    """Refuse delta >= 1 / n for the smallest client dataset: a mechanism that publishes one
    random example of n in the clear meets (0, 1/n)-DP, so such a delta guarantees nothing."""
    n_min = min(n for n in n_train if n > 0)
    if delta >= 1.0 / n_min:
        raise UsageError(
            f"delta={delta:g} is not below 1/n = {1.0 / n_min:.3g} for the smallest client "
            f"({n_min} training examples), which makes the guarantee meaningless; "
            f"use delta well below {1.0 / n_min:.3g}, e.g. {min(1e-5, 0.1 / n_min):.1g}"
        )


def check_epsilons(
    eps_values: Sequence[float | None],
    budgets: Sequence[tuple[float, int]],
    *,
    delta: float,
    calibration: str,
) -> None:
    """Refuse, before any run, a target eps that `plan_for_clients` would refuse for some
    client's (q, steps) because its noise would fall below the floor (privacy/accountant.py
    `max_supported_epsilon`); fast: no calibration."""
    accountant = "rdp" if calibration == "paper" else calibration
    for eps in eps_values:
        for q, steps in sorted({(q, steps) for q, steps in budgets if steps > 0}):
            if eps is not None:
                check_supported_epsilon(
                    eps=eps, delta=delta, sample_rate=q, steps=steps, accountant=accountant
                )


def plan_for_clients(
    budgets: Sequence[tuple[float, int]],
    *,
    eps: float,
    delta: float,
    clip_norm: float,
    rounds: int,
    calibration: str,
) -> PrivacyLedger:
    """One sigma meeting (eps, delta) for every client's (q, steps); the ledger records the
    largest epsilon any client spends and that client's (q, steps).

    >>> led = plan_for_clients([(0.5, 10), (0.25, 20)], eps=1.0, delta=1e-5, clip_norm=1.0,
    ...                        rounds=5, calibration="rdp")
    >>> led.eps_spent <= 1.0
    True
    """
    pairs = sorted({(q, steps) for q, steps in budgets if steps > 0})
    if not pairs:
        raise ValueError("no client takes a noisy step; nothing to calibrate")
    ledgers = [
        plan_privacy(
            eps=eps,
            delta=delta,
            clip_norm=clip_norm,
            sample_rate=q,
            steps=steps,
            rounds=rounds,
            calibration=calibration,
        )
        for q, steps in pairs
    ]
    worst = max(ledgers, key=lambda led: led.noise_multiplier)
    spent = [
        epsilon_spent(
            noise_multiplier=worst.noise_multiplier,
            sample_rate=q,
            steps=steps,
            delta=delta,
            accountant=worst.accountant,
        )
        for q, steps in pairs
    ]
    i = max(range(len(pairs)), key=lambda j: spent[j])
    return replace(worst, eps_spent=spent[i], sample_rate=pairs[i][0], steps=pairs[i][1])
