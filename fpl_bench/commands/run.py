"""``fpl-bench run``: parse the flags, build the spec, run the experiment (or a suite), print
the accuracy table (and, under DP, the privacy ledger) and write OUT/results.csv.

    fpl-bench run --methods promptfl,dpfpl --eps none,1 --rounds 10
    fpl-bench run --suite embedded --dry-run                # a suite's cells and estimates

Heavy imports (torch, pandas, the experiment) stay inside the functions, so `fpl-bench --help`
stays fast.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from fpl_bench import cli_options as opt
from fpl_bench.errors import UsageError
from fpl_bench.executors.options import ExecutorChoice, executor_options

ORDER = 0  # first in `fpl-bench --help` (fpl_bench/commands/__init__.py)

DEFAULT_OUT = Path("runs/default")


SHORT = {
    "local_acc": "local",
    "neighbor_acc": "neighbor",
    "base_acc": "base",
    "novel_acc": "novel",
    "hm": "HM",
    "source_acc": "source",
    "own_domain_acc": "own dom",
    "other_domain_acc": "other dom",
    "target_acc": "target",
    "global_acc": "global",
}


def format_table(frame: Any, metrics: list[str], with_privacy: bool) -> list[Any]:
    """Rich tables that fit 80 columns: accuracy (one row per (eps, method), mean ± std over the
    finished seeds, in %, or the value alone from one seed; a cell with no finished seed says
    why, e.g. diverged) and, under DP, the privacy ledger in a table of its own. A method run
    with tuned hyperparameters (`run --tuned`) reads 'NAME (tuned)'."""
    from rich import box
    from rich.table import Table

    from fpl_bench.report.leaderboard import seed_std

    accuracy = Table(box=box.SIMPLE_HEAD, padding=(0, 1))
    accuracy.add_column("eps", justify="right")
    accuracy.add_column("method")
    for m in metrics:
        accuracy.add_column(SHORT.get(m, m), justify="right")
    ledger = Table(box=box.SIMPLE_HEAD, padding=(0, 1))
    for name in ("eps", "method", "ε spent", "σ", "q", "steps"):
        ledger.add_column(name, justify="left" if name == "method" else "right")
    for (eps, method), group in frame.groupby(["eps", "method"], sort=False):
        finished = group[group["status"] == "finished"]
        if "tuned" in group and any(str(v).strip().lower() == "true" for v in group["tuned"]):
            method = f"{method} (tuned)"
        cells = [str(eps), method]
        for m in metrics:
            values = finished[m].astype(float).dropna() * 100
            if values.empty:
                cells.append("—" if len(finished) else "/".join(sorted(set(group["status"]))))
            elif len(values) == 1:  # one seed has no spread: no '± 0.0'
                cells.append(f"{values.mean():.1f}")
            else:
                cells.append(f"{values.mean():.1f}±{seed_std(values):.1f}")  # as leaderboards
        accuracy.add_row(*cells)
        spent = group["eps_spent"].astype(float)
        if with_privacy and not spent.isna().all():
            sigma = group["noise_multiplier"].astype(float).max()
            q = group["sample_rate"].astype(float).max()
            steps = group["steps"].astype(float).max()
            ledger.add_row(
                str(eps),
                method,
                f"{spent.max():.3f}",
                "—" if sigma != sigma or sigma == 0 else f"{sigma:.3g}",
                "—" if q != q else f"{q:.2f}",
                "—" if steps != steps else f"{int(steps)}",
            )
    return [accuracy, ledger] if with_privacy else [accuracy]


@opt.spec_options(*opt.SPEC_OPTIONS)
@executor_options
def run(
    *,
    methods: Annotated[
        str | None,
        typer.Option(
            help="Comma list of methods (presets, LEARNER@SCHEME pairs, or preset card files "
            "PATH.toml), or 'default' (the default: every preset but those that run a tower per "
            "image or prompt the image tower: CoCoOp, BPL, MaPLe, IVLP, PromptSRC) or 'all'; see `fpl-bench methods --all`. With --suite: "
            "only these of its cells."
        ),
    ] = None,
    eps: Annotated[
        str | None,
        typer.Option(
            help="Target epsilon(s) per client, comma list; 'none' = no DP (the default). "
            "With --suite: only these of its cells."
        ),
    ] = None,
    seeds: Annotated[
        str | None,
        typer.Option(
            help="Comma list of seeds (default 0). With --suite: only these of its cells."
        ),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(help="Method option METHOD.OPTION=VALUE (repeatable), e.g. dpfpl.rank=4."),
    ] = None,
    flags: opt.SpecFlags,
    suite: Annotated[
        str | None,
        typer.Option(
            help="Run a suite: NAME (leaderboards/NAME.toml) or a .toml path; cells finished "
            "in OUT/results.csv are skipped."
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="With --suite: list the cells, configs, the paper's numbers and time "
            "estimates (with --executor ray or slurm: each cell's request and the GPU-hours); "
            "run nothing.",
        ),
    ] = False,
    tuned: Annotated[
        bool,
        typer.Option(
            "--tuned",
            help="Use each (method, eps) study's best hyperparameters from `fpl-bench tune`; "
            "rows are marked tuned.",
        ),
    ] = False,
    storage: Annotated[
        str | None,
        typer.Option(
            help="With --tuned: the studies' storage (default OUT/optuna.db or OUT/optuna.journal)."
        ),
    ] = None,
    study: Annotated[
        str, typer.Option(help="With --tuned: the study name prefix given to tune.")
    ] = "tune",
    out: Annotated[
        str, typer.Option(help="Output folder (results.csv, mlflow.db, partitions, jobs).")
    ] = str(DEFAULT_OUT),
    cluster: ExecutorChoice,
    progress_view: Annotated[
        bool,
        typer.Option(
            "--progress",
            help="With --suite: print the suite's cells done, running and failed and an ETA, "
            "read from the tracking store (--tracking-uri); run nothing.",
        ),
    ] = False,
) -> None:
    """Run methods on a dataset at a privacy budget; print the table and write DIR/results.csv."""
    from rich.console import Console

    from fpl_bench.catalog import method_names, parse_params, resolve_method
    from fpl_bench.spec import parse_eps, parse_int_list

    if dry_run and suite is None:
        raise UsageError("--dry-run applies to --suite only")
    if progress_view and (suite is None or dry_run):
        raise UsageError("--progress applies to --suite only, without --dry-run")
    cluster.export_tracking_uri()  # local runs log to --tracking-uri too
    if suite is not None:
        if flags["dataset"] != opt.spec_default("dataset"):
            raise UsageError("--dataset: the suite sets the datasets; drop it")
        only = suite_filter(methods, eps, seeds)
        _run_suite(suite, out, dry_run, flags, only, cluster=cluster, progress_view=progress_view)
        return
    epsilons = None if eps is None else parse_eps(eps)
    names = method_names(
        "default" if methods is None else methods, client_dp=flags.client_dp(epsilons)
    )
    overrides = parse_params(param or [], names)
    spec = opt.spec_from_flags(
        flags,
        methods=tuple(resolve_method(name, overrides.get(name)) for name in names),
        eps=epsilons,
        seeds=None if seeds is None else parse_int_list(seeds, "--seeds"),
        out=_out_folder(out),
    )
    from fpl_bench.parallel import warm_workers_if_needed

    # the fork server's imports overlap with this process's own (fpl_bench/parallel.py)
    runs = len(spec.methods) * len(spec.eps) * len(spec.seeds)
    if not cluster.distributed:
        warm_workers_if_needed(workers=spec.workers, device=spec.device, runs=runs)
    specs = [spec]
    if tuned:
        from fpl_bench.tune import tuned_specs

        specs = tuned_specs(spec, storage=storage, prefix=study)  # one per (method, eps)
    elif storage is not None or study != "tune":
        raise UsageError("--storage and --study apply with --tuned only")

    import pandas as pd

    from fpl_bench.evaluate import PROTOCOL_METRICS
    from fpl_bench.experiment import run_experiment

    console = Console(stderr=False)
    err = Console(stderr=True)
    progress = TqdmProgress(specs)

    def log(text: str) -> None:
        if progress.bar:
            progress.write(text)
        else:  # one line per message, however wide (a log file has no width)
            err.print(text, markup=False, highlight=False, soft_wrap=True)

    frames = []
    try:
        if cluster.distributed:  # fpl_bench/executors/: the runs on Ray or Slurm
            from fpl_bench.executors.dispatch import run_on_cluster

            frames.append(run_on_cluster(specs, cluster, log=log))
        else:
            frames += [run_experiment(each, log=log, progress=progress) for each in specs]
    finally:
        progress.close()
    frame = pd.concat(frames, ignore_index=True)
    with_privacy = any(e is not None for e in spec.eps)
    spread = f"mean ± std over {len(spec.seeds)} seeds" if len(spec.seeds) > 1 else "1 seed"
    title = f"accuracy % on {spec.dataset}, {spec.protocol}, {spread}" + (
        f"; DP with {spec.trust} trust" if with_privacy else ""
    )
    console.print(title, highlight=False, markup=False)
    console.print(
        f"{spec.rounds} rounds x {spec.local_epochs} local epochs, batch {spec.batch_size}, "
        f"lr {spec.lr:g}{' (tuned rows: their studies)' if tuned else ''}, {spec.clients} "
        f"clients, {spec.shots} shots, backbone {spec.backbone}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    for table in format_table(frame, list(PROTOCOL_METRICS[spec.protocol]), with_privacy):
        console.print(table)
    console.print(
        f"wrote {Path(spec.out) / 'results.csv'} and MLflow runs "
        f"({math.ceil(process_seconds())} s since the command started)",
        highlight=False,
        markup=False,
    )


_IMPORTED = time.time()  # the fallback start where /proc is not there


def process_seconds() -> float:
    """Wall seconds since this process started, start-up and imports included (Linux: the
    start time in /proc/self/stat, in clock ticks since boot, against /proc/uptime); elsewhere
    since this module was imported."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            # field 22 is starttime; the command name (field 2) may hold spaces: split after ')'
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            return max(float(uptime.read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return time.time() - _IMPORTED


def _run_suite(
    name: str,
    out_text: str,
    dry_run: bool,
    flags: opt.SpecFlags,
    only: Any = None,
    *,
    cluster: ExecutorChoice | None = None,
    progress_view: bool = False,
) -> None:
    """`run --suite NAME [--dry-run]`: a grid from leaderboards/NAME.toml (fpl_bench/suite.py),
    the cells `only` keeps (--methods/--eps/--seeds), with the machine settings given (and
    --pretrained) over every cell; on `cluster` (fpl_bench/executors/) when it is not local."""
    from fpl_bench.suite import (
        MACHINE_FIELDS,
        dry_run_rows,
        format_dry_run,
        load_suite,
        run_suite,
    )

    chosen = load_suite(name)
    out = Path("runs") / chosen.name if out_text == str(DEFAULT_OUT) else _out_folder(out_text)
    given = flags.fields()
    overrides = {k: given[k] for k in (*MACHINE_FIELDS, "pretrained") if k in given}
    if dry_run:
        from fpl_bench.executors.estimate import format_requests, run_request

        device = overrides.get("device", "auto")
        on_cluster = cluster is not None and cluster.distributed
        # runs that ask the cluster for a GPU are estimated at a GPU's rate, not this node's
        on_gpus = on_cluster and bool(run_request(cluster, device)["gpus"])
        rows = dry_run_rows(
            chosen, out, overrides=overrides, only=only, device="cuda" if on_gpus else None
        )
        typer.echo(format_dry_run(chosen, rows))
        if on_cluster:
            typer.echo(format_requests(rows, cluster, device))
        return
    if progress_view:
        from fpl_bench.executors.progress import format_progress, suite_progress

        typer.echo(format_progress(suite_progress(chosen, out, cluster, overrides, only)))
        return
    from tqdm import tqdm

    run_suite(
        chosen,
        out,
        log=lambda t: tqdm.write(t, file=sys.stderr),
        overrides=overrides,
        progress=TqdmProgress,
        only=only,
        executor=cluster if cluster is not None and cluster.distributed else None,
    )
    typer.echo(f"wrote {out / 'results.csv'}; `fpl-bench leaderboard --runs {out}` for the tables")


def suite_filter(methods: str | None, eps: str | None, seeds: str | None) -> Any:
    """The suite cells that --methods/--eps/--seeds keep (None: every cell)."""
    from fpl_bench.report.records import normalize_eps
    from fpl_bench.spec import parse_eps, parse_int_list
    from fpl_bench.suite import CellFilter

    if methods is None and eps is None and seeds is None:
        return None
    from fpl_bench.catalog import method_names

    every = methods is None or methods.strip().lower() == "all"
    words = None if every else method_names(methods)  # refuses 'all' among names, repeats
    return CellFilter(
        methods=None if words is None else tuple(words),
        eps=None if eps is None else tuple(normalize_eps(e) for e in parse_eps(eps)),
        seeds=None if seeds is None else parse_int_list(seeds, "--seeds"),
    )


def _out_folder(text: str) -> Path:
    if not text.strip():
        raise UsageError("--out is empty; give a folder, e.g. --out runs/default")
    return Path(text)


class TqdmProgress:
    """Progress of the whole job on stderr: total = every run's rounds, so its ETA is the
    job's. On a terminal, one tqdm bar whose description says run k of N and round r of R.
    Where stderr is not a terminal (a pipe, a log file) a bar would be invisible, so plain lines
    instead: one when the first run starts, one when each run but the last is done (the job's
    elapsed time and about how long is left; the last run's own log line closes the job), and
    one every `PLAIN_EVERY_S` seconds inside a long run."""

    PLAIN_EVERY_S = 30.0

    def __init__(self, specs: Any, *, plain: bool | None = None) -> None:
        from fpl_bench.learners import LEARNERS

        self.total = sum(
            sum(s.rounds if LEARNERS.get(m.learner).trains else 1 for m in s.methods)
            * len(s.eps)
            * len(s.seeds)
            for s in (specs if isinstance(specs, list) else [specs])
        )
        self.plain = not sys.stderr.isatty() if plain is None else plain
        self.bar: Any = None
        self.label, self.rounds, self.done_before, self.index, self.runs = "", 0, 0, 0, 0
        self.started: float | None = None  # plain mode: when the first run started
        self.shown = 0.0  # plain mode: when the last line was printed

    def start_run(self, index: int, total: int, label: str, rounds: int) -> None:
        from tqdm import tqdm

        if self.plain:
            if self.started is not None:
                self._plain_done()
                self.done_before += max(self.rounds, 1)
        elif self.bar is None:
            self.bar = tqdm(
                total=self.total, unit="round", file=sys.stderr, leave=False, disable=None
            )
        else:  # close out the previous run (a zero-shot run has no rounds: count it as one)
            self.bar.n = self.done_before = self.done_before + max(self.rounds, 1)
        self.index, self.runs, self.label, self.rounds = index, total, label, rounds
        if self.plain and self.started is None:
            self.started = time.perf_counter()
            self._line(f"started; {total} runs, {self.total} rounds in the job")
        self.advance(0)

    def advance(self, rounds_done: int) -> None:
        if self.plain:
            now = time.perf_counter()
            if rounds_done and now - self.shown >= self.PLAIN_EVERY_S:
                done = self.done_before + rounds_done
                self._line(f"round {rounds_done}/{self.rounds}; {self._times(done)}")
            return
        if self.bar is None:
            return
        self.bar.set_description_str(
            f"run {self.index}/{self.runs} {self.label} round {rounds_done}/{self.rounds}",
            refresh=False,
        )
        self.bar.n = self.done_before + rounds_done
        self.bar.refresh()

    def _plain_done(self) -> None:
        done = self.done_before + max(self.rounds, 1)
        self._line(f"done; {self._times(done)}")

    def _times(self, done: int) -> str:
        """'41 s into the job, about 2 min left', from the rounds done out of the job's."""
        from fpl_bench.suite import format_seconds

        elapsed = time.perf_counter() - (self.started or time.perf_counter())
        text = f"{format_seconds(elapsed)} into the job"
        if 0 < done < self.total:
            text += f", about {format_seconds(elapsed / done * (self.total - done))} left"
        return text

    def _line(self, text: str) -> None:
        self.shown = time.perf_counter()
        print(f"run {self.index}/{self.runs} {self.label}: {text}", file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        # plain mode: the last run's own log line (its metrics) is its done line
        if self.bar is not None:
            self.bar.close()


def register(app: typer.Typer) -> None:
    """Add the ``run`` command to the CLI."""
    app.command("run")(run)
