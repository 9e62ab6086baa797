"""Print docs/audit.md's table: the one-run canary audit's 95% lower bound on epsilon for the
real mechanism and each test-only broken variant, under both trust models, seeds 0-9, at the
default `AuditSetting` (about a minute on one core).

    python benchmarks/canary_audit.py [--seeds 10]
"""

from __future__ import annotations

import argparse

import torch

from fpl_bench.privacy.canary_audit import AuditSetting, Variant, run_canary_audit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    setting = AuditSetting()
    print(f"target eps {setting.eps}, m = {setting.canaries}, T = {setting.steps}")
    print("| variant | trust | bounds by seed | min | max |")
    print("| --- | --- | --- | --- | --- |")
    for variant in Variant:
        for trust in ("client", "server"):
            bounds = [
                run_canary_audit(setting, variant, trust, seed=seed).bound.epsilon
                for seed in range(args.seeds)
            ]
            shown = " ".join(f"{b:.2f}" for b in bounds)
            print(
                f"| {variant.value} | {trust} | {shown} | {min(bounds):.2f} | {max(bounds):.2f} |"
            )


if __name__ == "__main__":
    main()
