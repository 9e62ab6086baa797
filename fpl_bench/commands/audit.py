"""``fpl-bench audit``: membership-inference attacks on the prompts a job's runs release, and
the one-run canary audit of each private run's mechanism (a lower bound on its epsilon).

    fpl-bench audit --methods coop,dpfpl --eps none,1 --seeds 0 --shadow-runs 4
    fpl-bench audit --methods coop --eps none --attacks loss      # no shadow runs needed

The job is `run`'s (same flags, same --out): runs not finished in OUT are trained, finished
ones reused. Each audited seed's runs are attacked (fpl_bench/audit.py); OUT/audit.csv gets one
row per method x eps x trust x seed x attack, MLflow one run each (experiment
`fpl-bench-audit`, in the accuracy runs' store). What the attacker sees: docs/audit.md,
"Membership inference".
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fpl_bench import cli_options as opt
from fpl_bench.errors import UsageError

METHODS_HELP = "Comma list of methods, as `run --methods` (default: run's default set)."
EPS_HELP = "Target epsilon(s) per client, comma list; 'none' = no DP (the default)."
SEEDS_HELP = "Comma list of the seeds to audit (default 0)."
PARAM_HELP = "Method option METHOD.OPTION=VALUE (repeatable), as `run --param`."
SHADOW_HELP = (
    "Runs under further seeds (the smallest not audited) that train the shadow attack; every "
    "other seed of the job shadows an audited one. The DP-FPL paper uses 50."
)
ATTACKS_HELP = (
    "Comma list of attacks: loss (threshold on the loss), shadow (per-label shadow models), "
    "canary (one-run canary audit of the private runs' mechanism: a lower bound on epsilon), "
    "input (black-box: one more run with 1000 mislabeled canaries, scored by the released "
    "models' loss; a lower bound on epsilon for every run; not in the default)."
)
OUT_HELP = "Output folder of the runs (results.csv, prompts/); audit.csv is written there."

Methods = Annotated[str | None, typer.Option(help=METHODS_HELP)]
Epsilons = Annotated[str | None, typer.Option(help=EPS_HELP)]
Seeds = Annotated[str | None, typer.Option(help=SEEDS_HELP)]
Params = Annotated[list[str] | None, typer.Option(help=PARAM_HELP)]
ShadowRuns = Annotated[int, typer.Option(help=SHADOW_HELP)]
Attacks = Annotated[str, typer.Option(help=ATTACKS_HELP)]
Out = Annotated[str, typer.Option(help=OUT_HELP)]


@opt.spec_options(*(name for name in opt.SPEC_OPTIONS if name != "resume"))
def audit(
    *,
    methods: Methods = None,
    eps: Epsilons = None,
    seeds: Seeds = None,
    param: Params = None,
    flags: opt.SpecFlags,
    shadow_runs: ShadowRuns = 1,
    attacks: Attacks = "loss,shadow,canary",
    out: Out = "runs/default",
) -> None:
    """Membership inference on the runs' released prompts and a canary audit of their
    mechanism (an epsilon lower bound); print it and write DIR/audit.csv."""
    from fpl_bench.audit import AuditJob, run_audit, shadow_seeds
    from fpl_bench.catalog import method_names, parse_params, resolve_method
    from fpl_bench.commands.run import TqdmProgress
    from fpl_bench.spec import parse_eps, parse_int_list

    chosen = _attacks(attacks)
    if shadow_runs < 0:
        raise UsageError(f"--shadow-runs {shadow_runs}: must be 0 or more")
    targets = parse_int_list(seeds or "0", "--seeds")
    if not targets:
        raise UsageError(f"--seeds {seeds}: give at least one seed, e.g. --seeds 0")
    extra = shadow_seeds(targets, shadow_runs) if "shadow" in chosen else ()
    if "shadow" in chosen and len(targets) + len(extra) < 2:
        raise UsageError(
            "--shadow-runs 0 with one seed: the shadow attack needs runs under other seeds; "
            "give --shadow-runs 1 or more, or drop it with --attacks loss"
        )
    if not out.strip():
        raise UsageError("--out is empty; give a folder, e.g. --out runs/default")
    epsilons = parse_eps(eps) if eps is not None else None
    words = method_names(methods or "default", client_dp=flags.client_dp(epsilons))
    options = parse_params(param or [], words)
    spec = opt.spec_from_flags(
        flags,
        methods=tuple(resolve_method(word, options.get(word)) for word in words),
        eps=epsilons,
        seeds=targets + extra,
        resume=True,  # finished runs in OUT are reused
        out=Path(out),
    )
    job = AuditJob(spec=spec, targets=targets, attacks=chosen)
    progress = TqdmProgress(spec)
    try:
        frame = run_audit(job, log=progress.write, progress=progress)
    finally:
        progress.close()
    _show(frame, spec)


def _attacks(text: str) -> tuple[str, ...]:
    """--attacks as a tuple of known attack names, in the order given."""
    from fpl_bench.audit import ATTACKS

    words = tuple(dict.fromkeys(w.strip().lower() for w in text.split(",") if w.strip()))
    unknown = [w for w in words if w not in ATTACKS]
    if unknown or not words:
        raise UsageError(f"--attacks {text}: unknown attack; known: {', '.join(ATTACKS)}")
    return words


def _show(frame: Any, spec: Any) -> None:
    """The audit's rows as one table (in %), and where they were written."""
    import pandas as pd
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1))
    columns = ("eps", "method", "seed", "attack", "bal acc", "AUC", "TPR@1%FPR", "in/out", "eps >=")
    for name in columns:
        table.add_column(name, justify="left" if name in ("method", "attack") else "right")
    for row in frame.to_dict("records"):
        canary = row["attack"] == "canary"
        table.add_row(
            str(row["eps"]),
            str(row["method"]),
            str(row["seed"]),
            str(row["attack"]),
            *(
                "" if canary else f"{100 * float(row[c]):.1f}"
                for c in ("balanced_acc", "auc", "tpr_at_1fpr")
            ),
            f"{int(row['correct'])}/{int(row['guesses'])} right"
            if canary
            else f"{int(row['n_members'])}/{int(row['n_nonmembers'])}",
            "" if pd.isna(row["eps_lower"]) else f"{float(row['eps_lower']):.2f}",
        )
    console = Console()
    console.print(
        f"membership inference on {spec.dataset}, {spec.protocol}, {spec.trust} trust "
        "(chance: 50 / 50 / 1; eps >=: the canary audits' lower bound at 95%)",
        highlight=False,
        markup=False,
    )
    console.print(table)
    console.print(f"wrote {Path(spec.out) / 'audit.csv'}", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    """Add the ``audit`` command to the CLI."""
    app.command("audit")(audit)
