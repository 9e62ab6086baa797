"""Cross-check the accountants on every private setting of the shipped suites.

    python benchmarks/accountants.py [SUITE ...]      # default: every suite, every seed

One line per distinct (q, sigma, steps, delta): Opacus RDP (ours), Google RDP, Opacus PRV,
Google PLD, the gap within each kind, and how much smaller PLD's epsilon is than ours at the
same sigma (fpl_bench/privacy/crosscheck.py). Exit 1 when a rule of that module breaks. Every
suite and seed takes about 10 min on one core (mostly calibrating sigma for the CIFAR-100
table); the tests check seed 0 of each suite.
"""

from __future__ import annotations

import sys

from fpl_bench.privacy.crosscheck import crosscheck, disagreements, suite_settings


def main(suites: list[str]) -> int:
    settings = suite_settings(suites or None)
    print(
        "use | q | steps | sigma | opacus_rdp | google_rdp | opacus_prv | google_pld | pld_saving"
    )
    broken = 0
    for s in settings:
        r = crosscheck(*s.key)
        print(
            f"{s.uses[0]} | {s.sample_rate:.4g} | {s.steps} | {s.noise_multiplier:g} | "
            f"{r['opacus_rdp']:.5g} | {r['google_rdp']:.5g} | {r['opacus_prv']:.5g} | "
            f"{r['google_pld']:.5g} | {r['pld_saving']:.1%}"
        )
        for line in disagreements(r):
            broken += 1
            print(f"  DISAGREE: {line}")
    print(f"{len(settings)} settings, {broken} disagreements")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
