"""How much less noise `--accountant pld` needs than RDP on the embedded default.

    python benchmarks/accountant_tightness.py [EPS ...]        # default: 0.5 1

The settings are derived as a run derives them (fpl_bench/prepare.py, privacy/planning.py):
the default job (`fpl-bench run` with no flags but the methods: synthetic data, 10 clients,
20 rounds of 2 local epochs, batch 32) and the embedded suite's schedule (10 rounds of 1
epoch, leaderboards/embedded.toml), seed 0; every client's (q, noisy steps) from
`prepare.run_budgets`, one sigma for them all from `planning.plan_for_clients`. For each
schedule, grouping (one trainer per client; one for the pooled data, the central preset) and
target eps, one line per accountant:

    sigma      the calibrated noise multiplier (a run's ledger records it)
    eps        what that accountant certifies for it (<= the target)
    s/rdp      sigma over RDP's sigma: the noise PLD saves, with its tolerance (1% of eps)
    pld@rdp    PLD's epsilon at RDP's sigma, and 1 - that / RDP's epsilon: the same noise,
               certified tighter (no calibration tolerance in this figure)

and the seconds each calibration took on this machine (a cold in-process cache; the disk cache
is off).
"""

from __future__ import annotations

import sys
import time
import warnings

from fpl_bench.catalog import resolve_method
from fpl_bench.prepare import partition_clients, run_budgets
from fpl_bench.privacy import accountant
from fpl_bench.privacy.crosscheck import _client_pool
from fpl_bench.privacy.planning import plan_for_clients
from fpl_bench.spec import ExperimentSpec

SCHEDULES = {
    "default job (20 rounds x 2 epochs)": {},
    "embedded suite (10 rounds x 1 epoch)": {"rounds": 10, "local_epochs": 1},
}


def main(targets: list[float]) -> int:
    accountant.use_calibration_cache(None)
    print("schedule | trainers | eps | accountant | q | steps | sigma | eps spent | s/rdp | s")
    for name, schedule in SCHEDULES.items():
        spec = ExperimentSpec(methods=(resolve_method("coop"),), eps=tuple(targets), **schedule)
        splits, _ = _client_pool(spec, data_root=None, cache_dir=None)
        _, split = partition_clients(spec, splits, 0)
        for pooled in (False, True):
            budgets = run_budgets(spec, split, 0, pooled=pooled)
            trainers = "pooled" if pooled else "per client"
            for eps in targets:
                ledgers = {}
                for acc in ("rdp", "pld"):
                    t0 = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        ledgers[acc] = plan_for_clients(
                            budgets,
                            eps=eps,
                            delta=spec.delta,
                            clip_norm=spec.clip_norm,
                            rounds=spec.rounds,
                            calibration=acc,
                        )
                    took = time.perf_counter() - t0
                    led = ledgers[acc]
                    ratio = led.noise_multiplier / ledgers["rdp"].noise_multiplier
                    print(
                        f"{name} | {trainers} | {eps:g} | {acc} | {led.sample_rate:.4g} | "
                        f"{led.steps} | {led.noise_multiplier:.4f} | {led.eps_spent:.4f} | "
                        f"{ratio:.3f} | {took:.1f}"
                    )
                rdp = ledgers["rdp"]
                at_rdp = accountant.epsilon_spent(
                    noise_multiplier=rdp.noise_multiplier,
                    sample_rate=rdp.sample_rate,
                    steps=rdp.steps,
                    delta=rdp.delta,
                    accountant="pld",
                )
                print(
                    f"{name} | {trainers} | {eps:g} | pld@rdp | {rdp.sample_rate:.4g} | "
                    f"{rdp.steps} | {rdp.noise_multiplier:.4f} | {at_rdp:.4f} | "
                    f"eps -{1 - at_rdp / rdp.eps_spent:.1%} | -"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main([float(a) for a in sys.argv[1:]] or [0.5, 1.0]))
