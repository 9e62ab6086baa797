"""`fpl-bench leaderboard` and `fpl-bench regress`: reports over finished runs.

    fpl-bench leaderboard --runs runs/default --out leaderboards --name embedded
    fpl-bench leaderboard --tracking-uri sqlite:///runs/default/mlflow.db --out /tmp/lb
    fpl-bench regress --baseline leaderboards/embedded.csv --runs runs/embedded
    fpl-bench regress --baseline leaderboards/embedded.csv --methods promptfl   # runs its cells

`regress` exits 0 when no cell dropped, 1 on a regression (naming the cells), 2 on bad input.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from fpl_bench.cli_options import CacheDir, DataRoot, Device, cache_dir_or_env
from fpl_bench.errors import UsageError

DEFAULT_RUNS = Path("runs/default")
DEFAULT_LEADERBOARD_OUT = Path("leaderboards")


def leaderboard(
    runs: Annotated[
        Path | None,
        typer.Option(help="Run folder holding results.csv (default runs/default)."),
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="Read MLflow runs instead, e.g. sqlite:///runs/default/mlflow.db."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Output folder (default: the --runs folder, or ./leaderboards)."),
    ] = None,
    name: Annotated[
        str, typer.Option(help="File stem: NAME.md, NAME.csv, NAME.html, NAME-plots/.")
    ] = "leaderboard",
    png: Annotated[
        bool, typer.Option("--png/--no-png", help="Also write the figures as PNG files.")
    ] = True,
    title: Annotated[str | None, typer.Option(help="Page and document title.")] = None,
    add_to: Annotated[
        Path | None,
        typer.Option(
            help="A leaderboard CSV whose cells the runs do not hold are kept as they are "
            "(presets added to a suite join its leaderboard without rerunning the rest), "
            "e.g. leaderboards/embedded.csv."
        ),
    ] = None,
) -> None:
    """Tables (Markdown, CSV), figures (PNG) and one HTML page from finished runs."""
    from fpl_bench.jobs import check_writable_folder
    from fpl_bench.report.audits import read_audits
    from fpl_bench.report.build import check_name, write_leaderboard
    from fpl_bench.report.regression import read_leaderboard
    from fpl_bench.report.sources import load_configs, load_records

    check_name(name)
    earlier = read_leaderboard(add_to, "--add-to") if add_to is not None else None
    records, source = load_records(runs, tracking_uri)
    configs = load_configs(runs or DEFAULT_RUNS) if tracking_uri is None else {}
    # the runs' membership and canary audit (`fpl-bench audit`), read from the run folder
    audits = read_audits(runs or DEFAULT_RUNS) if tracking_uri is None else None
    if out is None:
        out = (runs or DEFAULT_RUNS) if tracking_uri is None else DEFAULT_LEADERBOARD_OUT
    check_writable_folder(out, "--out")
    written = write_leaderboard(
        records,
        out=out,
        name=name,
        source=source if add_to is None else f"{source}; the other cells from {add_to}",
        png=png,
        title=title,
        configs=configs,
        audits=audits,
        earlier=earlier,
    )
    typer.echo(f"read {len(records)} run(s) from {source}")
    if earlier is not None:
        typer.echo(f"kept the cells of {add_to} that the runs do not hold")
    for line in written.dropped:
        typer.echo(
            f"warning: {line}: the cell now has the runs' seeds only; to pool them, run the "
            "missing seeds into the same runs folder",
            err=True,
        )
    if written.superseded:
        typer.echo(
            f"left out {written.superseded} run(s) of older configurations "
            "(each cell shows its latest config_hash)"
        )
    files = [
        written.markdown,
        written.csv,
        written.facts,
        written.audit,
        written.html,
        *written.pngs,
    ]
    for path in (p for p in files if p is not None):
        typer.echo(f"wrote {path}")


def regress(
    baseline: Annotated[
        Path, typer.Option(help="Leaderboard CSV to compare with, e.g. leaderboards/embedded.csv.")
    ],
    runs: Annotated[
        Path | None,
        typer.Option(
            help="Compare the finished runs in DIR (default: run the baseline's cells first)."
        ),
    ] = None,
    methods: Annotated[
        str | None, typer.Option(help="Only these methods of the baseline (comma list).")
    ] = None,
    eps: Annotated[
        str | None, typer.Option(help="Only these eps values of the baseline (comma list).")
    ] = None,
    seeds: Annotated[
        str | None,
        typer.Option(help="Run only these of the baseline's seeds (comma list; default all)."),
    ] = None,
    work: Annotated[
        Path | None,
        typer.Option(
            help="Without --runs: where the baseline's cells run and resume (default "
            "runs/regress-NAME for leaderboards/NAME.csv)."
        ),
    ] = None,
    data_root: DataRoot = None,
    cache_dir: CacheDir = None,
    device: Device = "auto",
    tolerance: Annotated[
        float, typer.Option(help="Smallest drop that counts, as a fraction (0.02 = 2 points).")
    ] = 0.02,
    k: Annotated[
        float, typer.Option("--k", help="A drop must also exceed k x the baseline's seed std.")
    ] = 2.0,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for regression.md (default: the folder of the runs)."),
    ] = None,
) -> None:
    """Compare runs with a committed leaderboard; exit 1 when a cell dropped.

    Without --runs, runs (or resumes) exactly the baseline cells it compares, with the
    configuration and seeds the leaderboard records, then compares."""
    if not (math.isfinite(tolerance) and math.isfinite(k)):
        raise UsageError(f"--tolerance {tolerance} --k {k}: both must be finite numbers >= 0")
    if out is not None:
        from fpl_bench.jobs import check_writable_folder

        check_writable_folder(out, "--out")
    from fpl_bench.report.build import write_text
    from fpl_bench.report.leaderboard import summarize
    from fpl_bench.report.regression import (
        Thresholds,
        compare,
        deltas_markdown,
        fact_lines,
        read_leaderboard,
        regression_lines,
        select_cells,
        summary_line,
    )
    from fpl_bench.report.sources import load_results_dir

    if tolerance < 0 or k < 0:
        raise UsageError(f"--tolerance {tolerance} --k {k}: both must be >= 0")
    if runs is not None and (work is not None or seeds is not None):
        raise UsageError("--work and --seeds choose what regress runs: not with --runs")
    base = read_leaderboard(baseline)
    base = select_cells(base, methods=_words(methods), eps=_words(eps))
    if runs is None:
        runs = work or Path("runs") / f"regress-{baseline.stem}"
        _run_cells(base, runs, seeds, data_root, cache_dir, device)
    current = summarize(load_results_dir(runs))
    thresholds = Thresholds(tolerance=tolerance, k=k)
    deltas = compare(
        base,
        current,
        thresholds,
        baseline_name=str(baseline),
        how_to_run=suite_hint(baseline),
    )
    lost = fact_lines(base, current)
    text = deltas_markdown(deltas, thresholds, f"Regression check against {baseline}")
    if lost:
        text += "\nFacts that held in the baseline and no longer hold:\n\n"
        text += "".join(f"- {line}\n" for line in lost)
    path = Path(out or runs) / "regression.md"
    write_text(path, text)
    typer.echo(text)
    typer.echo(f"wrote {path}")
    typer.echo(summary_line(deltas), err=True)
    bad = regression_lines(deltas) + lost
    if bad:
        typer.echo(f"{len(bad)} regression(s):", err=True)
        for line in bad:
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(code=1)


def _words(text: str | None) -> list[str] | None:
    """'a, b' -> ['a', 'b']; None stays None."""
    return None if text is None else [w.strip() for w in text.split(",") if w.strip()]


def _run_cells(
    cells: object,
    work: Path,
    seeds: str | None,
    data_root: Path | None,
    cache_dir: Path | None,
    device: str,
) -> None:
    """Run (or resume) in `work` every configuration the chosen baseline cells need."""
    import sys

    from fpl_bench.experiment import run_experiment
    from fpl_bench.report.records import normalize_eps
    from fpl_bench.report.regression import rerun_plan
    from fpl_bench.spec import parse_int_list, spec_from_config

    chosen = None if seeds is None else list(parse_int_list(seeds, "--seeds"))
    plan = rerun_plan(cells, chosen)
    for index, rerun in enumerate(plan, 1):
        spec = spec_from_config(
            rerun.config,
            eps=tuple(None if e == "none" else float(normalize_eps(e)) for e in rerun.eps),
            seeds=rerun.seeds,
            out=work,
            resume=True,
            data_root=data_root,
            cache_dir=cache_dir_or_env(cache_dir),
            device=device,
        )
        print(
            f"regress: configuration {index}/{len(plan)} ({rerun.config['method']}, eps "
            f"{','.join(rerun.eps)}, seeds {','.join(map(str, rerun.seeds))}) into {work}",
            file=sys.stderr,
        )
        run_experiment(spec, log=lambda text: print(text, file=sys.stderr))


def suite_hint(baseline: Path) -> str:
    """How to produce runs of a baseline's configuration: its suite when a suite has the
    baseline's name (leaderboards/embedded.csv <- the suite embedded)."""
    from fpl_bench.suite import list_suites

    if baseline.stem in list_suites():
        return f"`fpl-bench run --suite {baseline.stem} --out DIR`, then --runs DIR"
    return "the suite that made it"


def register(app: typer.Typer) -> None:
    """Add `leaderboard` and `regress` to the CLI."""
    app.command("leaderboard")(leaderboard)
    app.command("regress")(regress)
