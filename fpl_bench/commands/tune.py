"""``fpl-bench tune``: one Optuna study per (method, dataset, protocol, trust, eps).

    fpl-bench tune --methods promptfl --eps 0.5 --trials 8
    fpl-bench tune --methods all --eps 0.5,1 --trials 20 --workers 2          # journal file
    fpl-bench tune --methods dpfpl --eps 1 --trials 40 \\
        --storage postgresql://fpl:fpl@db-host:5432/fpl_optuna                # on each machine

Trials train on the training split and are scored on the validation split only. The default
schedule is shorter than `fpl-bench run`'s (`TUNE_DEFAULTS` below) so that a small
study fits in minutes on a laptop; `fpl-bench run --tuned` then trains with the best values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fpl_bench import cli_options as opt
from fpl_bench.errors import UsageError
from fpl_bench.executors.options import ExecutorChoice, executor_options

# The tuning schedule: a trial trains the first 4 rounds of the run it tunes for (whose --rounds
# set the DP noise), evaluated every other round (each evaluation but the last can prune); the
# objective is the mean of the last 2 evaluations.
TUNE_DEFAULTS: dict[str, Any] = {"trial_rounds": 4, "eval_every": 2, "last_k": 2}


# The spec options tune takes: all but those it declares with a meaning of its own (above all,
# the schedule of a trial) and those a study has no use for.
TUNE_OWN = ("rounds", "eval_every", "last_k", "threads", "workers")
NOT_TUNED = ("transfer_datasets", "target_domain", "resume", "secure_noise", "curve")
TUNE_SPEC_OPTIONS = tuple(n for n in opt.SPEC_OPTIONS if n not in TUNE_OWN + NOT_TUNED)


@opt.spec_options(*TUNE_SPEC_OPTIONS)
@executor_options
def tune_cmd(
    *,
    methods: Annotated[
        str,
        typer.Option(
            help="Comma list of presets to tune, or 'all' (the presets with a search table)."
        ),
    ],
    trials: Annotated[
        int,
        typer.Option(
            min=1, help="Trials per study, in total over every worker (a rerun extends a study)."
        ),
    ],
    eps: Annotated[
        str, typer.Option(help="Target epsilon(s), comma list; one study each; 'none' = no DP.")
    ] = "none",
    flags: opt.SpecFlags,
    rounds: Annotated[
        int, typer.Option(help="Rounds of the run being tuned for (sets the DP noise).")
    ] = opt.spec_default("rounds"),
    trial_rounds: Annotated[
        int, typer.Option(min=1, help="Rounds a trial trains: the first N of --rounds.")
    ] = TUNE_DEFAULTS["trial_rounds"],
    eval_every: Annotated[int, typer.Option(help="Evaluate (and maybe prune) every N rounds.")] = (
        TUNE_DEFAULTS["eval_every"]
    ),
    last_k: Annotated[int, typer.Option(help="Objective: mean of the last k evaluations.")] = (
        TUNE_DEFAULTS["last_k"]
    ),
    seeds: Annotated[str, typer.Option(help="Training seeds of each trial (value: the mean).")] = (
        "0"
    ),
    threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads per worker (default 1: a trial's steps are small, and threads "
            "that oversubscribe the cores slow them tenfold; use --workers for more cores)."
        ),
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            help="sqlite:///FILE.db, FILE.journal or postgresql://USER:PASS@HOST:PORT/DB "
            "(default: OUT/optuna.db; OUT/optuna.journal with --workers > 1)."
        ),
    ] = None,
    study: Annotated[
        str, typer.Option(help="Study name prefix: PREFIX-METHOD-DATASET-PROTOCOL-TRUST-epsE.")
    ] = "tune",
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Worker processes on this machine, one study at a time (with --executor ray "
            "or slurm: workers on the cluster).",
        ),
    ] = 1,
    timeout: Annotated[
        float | None, typer.Option(help="Start no new trial after this many seconds.")
    ] = None,
    sampler_seed: Annotated[int, typer.Option(help="Study seed of the TPE samplers.")] = 0,
    heartbeat: Annotated[
        int, typer.Option(min=1, help="Seconds between heartbeats of a running trial (RDB).")
    ] = 20,
    out: Annotated[Path, typer.Option(help="Output folder (optuna.db, mlflow.db).")] = Path(
        "runs/default"
    ),
    cluster: ExecutorChoice,
) -> None:
    """Tune the methods' hyperparameters on the validation split (one Optuna study each)."""
    cluster.export_tracking_uri()
    if workers > 1 and not cluster.distributed:  # the fork server's imports overlap (parallel.py)
        from fpl_bench.parallel import TUNE_WORKER_MODULES, warm_workers

        warm_workers(TUNE_WORKER_MODULES)
    from fpl_bench import tune as tuning
    from fpl_bench.catalog import resolve_method
    from fpl_bench.spec import parse_eps, parse_int_list

    epsilons = parse_eps(eps)
    names = _tunable(methods, client_dp=flags.client_dp(epsilons))
    target = tuning.parse_storage(storage, out=out, workers=workers)
    spec = opt.spec_from_flags(
        flags,
        methods=tuple(resolve_method(name) for name in names),
        eps=epsilons,
        seeds=parse_int_list(seeds, "--seeds"),
        rounds=rounds,
        eval_every=eval_every,
        last_k=last_k,
        threads=threads or 1,
        out=out,
        eval_split="val",
    )
    if trial_rounds > spec.rounds:
        raise UsageError(f"--trial-rounds {trial_rounds}: more than --rounds {spec.rounds}")
    for name in names:
        tuning.check_search_space(name, spec)
    tuning.check_storage(target)
    job = tuning.TuneJob(
        spec=spec,
        trials=trials,
        storage=target,
        trial_rounds=trial_rounds,
        prefix=study,
        sampler_seed=sampler_seed,
        workers=workers,
        timeout=timeout,
        heartbeat_interval=heartbeat,
    )
    typer.echo(
        f"tuning {len(job.cells())} stud{'y' if len(job.cells()) == 1 else 'ies'} x {trials} "
        f"trials on the validation split ({job.metric}); storage {target.shown}",
        err=True,
    )
    if cluster.distributed:  # the workers as Ray tasks or Slurm jobs (fpl_bench/executors/)
        from fpl_bench.executors.tuning import tune_on_cluster

        lines, failed = tune_on_cluster(job, cluster, log=lambda s: typer.echo(s, err=True))
    else:
        lines, failed = tuning.tune(job, log=lambda s: typer.echo(s, err=True))
    for line in lines:
        typer.echo(line)
    shown = [choice.card or choice.label for choice in spec.methods]  # a card file by its path
    typer.echo(
        f"use them: fpl-bench run --tuned --methods {','.join(shown)} --eps {eps} "
        f"--out {out}"
        + (f" --storage {target.shown}" if storage else "")
        + (f" --study {study}" if study != "tune" else "")
    )
    if failed:
        typer.echo(f"fpl-bench: error: {len(failed)} worker(s) failed (see above)", err=True)
        raise typer.Exit(1)


def _tunable(methods: str, *, client_dp: bool = False) -> list[str]:
    """The presets to tune: `all` is every preset with a [search] table (that can run: see
    `catalog.group_presets`); a named method without one is an error (one line)."""
    from fpl_bench.catalog import method_names, preset_cards

    if methods.strip().lower() == "all":
        names = method_names("all", client_dp=client_dp)
        return [n for n in names if preset_cards()[n].search]
    names = method_names(methods, client_dp=client_dp)
    from fpl_bench.tune import search_space

    for name in names:
        search_space(name)
    return names


def register(app: typer.Typer) -> None:
    """Add the ``tune`` command to the CLI."""
    app.command("tune")(tune_cmd)
