"""fpl-bench command line: parse, build the spec, call the library, print.

A `UsageError` (or a click usage error) becomes one line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import click
import typer
import typer._click.exceptions as _typer_click
import typer.exceptions as _typer_exc

from fpl_bench.errors import UsageError

# typer ships its own copy of click: catch the exceptions of both.
_CLICK_USAGE = (click.exceptions.UsageError, _typer_click.UsageError)
_CLICK_ERROR = (click.exceptions.ClickException, _typer_click.ClickException)
_CLICK_ABORT = (click.exceptions.Abort, _typer_exc.Abort)
_CLICK_EXIT = (click.exceptions.Exit, _typer_exc.Exit)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Benchmark federated prompt-learning methods on CLIP under differential privacy.",
)

DEFAULT_OUT = Path("runs/default")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"fpl-bench {version('fpl-bench')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = None,
) -> None:
    """Benchmark federated prompt-learning methods on CLIP under differential privacy."""


def _default(field: str) -> Any:
    """The ExperimentSpec default of `field`, so the CLI and the spec cannot disagree."""
    from fpl_bench.spec import ExperimentSpec

    return ExperimentSpec.model_fields[field].default


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
}


def format_table(frame: Any, metrics: list[str], with_privacy: bool) -> list[Any]:
    """Rich tables that fit 80 columns: accuracy (one row per (eps, method), mean ± std over the
    finished seeds, in %; a cell with no finished seed says why, e.g. diverged) and, under DP,
    the privacy ledger in a table of its own."""
    from rich import box
    from rich.table import Table

    several = frame.groupby(["eps", "method"], sort=False).size().max() > 1
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
        cells = [str(eps), method]
        for m in metrics:
            values = finished[m].astype(float) * 100
            if values.isna().all():
                cells.append("—" if len(finished) else "/".join(sorted(set(group["status"]))))
                continue
            std = values.std(ddof=0) if len(values) > 1 else 0.0
            cells.append(f"{values.mean():.1f}±{std:.1f}" if several else f"{values.mean():.1f}")
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


@app.command()
def run(
    methods: Annotated[
        str,
        typer.Option(
            help="Comma list of methods (presets, or LEARNER@SCHEME pairs), or 'all'; "
            "see `fpl-bench methods --all`."
        ),
    ] = "all",
    eps: Annotated[
        str, typer.Option(help="Target epsilon(s) per client, comma list; 'none' = no DP.")
    ] = "none",
    delta: Annotated[float, typer.Option(help="Target delta.")] = _default("delta"),
    clip_norm: Annotated[float, typer.Option(help="Per-sample clipping norm C.")] = _default(
        "clip_norm"
    ),
    accountant: Annotated[
        str, typer.Option(help="Noise calibration: rdp, prv, or paper (DP-FPL closed form).")
    ] = _default("accountant"),
    dataset: Annotated[
        str, typer.Option(help="Dataset card name (see `fpl-bench datasets`).")
    ] = _default("dataset"),
    data_root: Annotated[
        Path | None, typer.Option(help="Folder holding the dataset files.")
    ] = None,
    dataset_option: Annotated[
        list[str] | None,
        typer.Option(help="Dataset option KEY=VALUE (repeatable), e.g. domain=noise."),
    ] = None,
    protocol: Annotated[
        str, typer.Option(help="base2novel, personalized, multi-domain or cross-domain.")
    ] = _default("protocol"),
    transfer_datasets: Annotated[
        str | None,
        typer.Option(help="cross-dataset: comma list of datasets the prompts are scored on."),
    ] = None,
    target_domain: Annotated[
        str | None, typer.Option(help="cross-domain: the held-out domain (default: the last).")
    ] = None,
    partition: Annotated[
        str, typer.Option(help="pathological, dirichlet, iid or by_domain.")
    ] = _default("partition"),
    alpha: Annotated[
        float | None,
        typer.Option(
            help=f"Dirichlet concentration (--partition dirichlet; default {_default('alpha')})."
        ),
    ] = None,
    clients: Annotated[int, typer.Option(help="Number of clients.")] = _default("clients"),
    client_fraction: Annotated[
        float, typer.Option(help="Fraction of clients sampled per round.")
    ] = _default("client_fraction"),
    rounds: Annotated[int, typer.Option(help="Communication rounds.")] = _default("rounds"),
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = _default(
        "local_epochs"
    ),
    shots: Annotated[
        int, typer.Option(help="Training shots per class per client (0 = all).")
    ] = _default("shots"),
    batch_size: Annotated[
        int, typer.Option(help="Local batch size (expected size under DP).")
    ] = _default("batch_size"),
    lr: Annotated[float, typer.Option(help="SGD learning rate.")] = _default("lr"),
    n_ctx: Annotated[int, typer.Option(help="Number of learnable context vectors.")] = _default(
        "n_ctx"
    ),
    eval_every: Annotated[int, typer.Option(help="Evaluate every N rounds.")] = _default(
        "eval_every"
    ),
    last_k: Annotated[
        int, typer.Option(help="Final figure: mean over the last k evaluations.")
    ] = _default("last_k"),
    seeds: Annotated[str, typer.Option(help="Comma list of seeds.")] = "0",
    backbone: Annotated[
        str,
        typer.Option(
            help="open_clip model name or a model-config .json (default: the embedded tiny CLIP)."
        ),
    ] = _default("backbone"),
    pretrained: Annotated[
        str | None,
        typer.Option(
            help="open_clip tag (e.g. openai), a weights file (.pt/.safetensors, OpenAI's "
            "TorchScript .pt), or none (random weights)."
        ),
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Local checkpoint (state dict) for --backbone.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = _default("device"),
    threads: Annotated[
        int | None,
        typer.Option(help="CPU threads for training (default: 1 for the embedded model)."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Runs in parallel processes (default: on CPU, the usable cores for a job "
            "large enough to pay for starting them; 1 on CUDA).",
            min=1,
        ),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(help="Method option METHOD.OPTION=VALUE (repeatable), e.g. dpfpl.rank=4."),
    ] = None,
    trust: Annotated[
        str,
        typer.Option(
            help="Trust model under DP: server (trusted aggregator adds the noise to shared "
            "parameters) or client (every client noises everything it sends)."
        ),
    ] = _default("trust"),
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
            "estimates; run nothing.",
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
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the job in --out: skip finished runs, continue checkpointed ones.",
        ),
    ] = False,
    fp32: Annotated[
        bool,
        typer.Option(
            "--fp32", help="Keep the frozen towers in fp32 (default: bf16 where it is native)."
        ),
    ] = False,
    secure_noise: Annotated[
        bool,
        typer.Option(
            "--secure-noise",
            help="Draw DP noise from the OS's cryptographically secure source (not seeded).",
        ),
    ] = False,
    out: Annotated[
        str, typer.Option(help="Output folder (results.csv, mlflow.db, partitions, jobs).")
    ] = str(DEFAULT_OUT),
    cache_dir: Annotated[
        Path | None, typer.Option(help="Feature/data cache (default ~/.cache/fpl-bench).")
    ] = None,
) -> None:
    """Run methods on a dataset at a privacy budget; print the table and write DIR/results.csv."""
    from rich.console import Console

    from fpl_bench.catalog import method_names, parse_params, parse_value, resolve_method
    from fpl_bench.spec import parse_eps, parse_int_list

    if dry_run and suite is None:
        raise UsageError("--dry-run applies to --suite only")
    if suite is not None:
        if methods != "all" or eps != "none" or seeds != "0" or dataset != _default("dataset"):
            raise UsageError("--methods/--eps/--seeds/--dataset: the suite sets them; drop them")
        _run_suite(suite, out, dry_run, data_root, cache_dir, device, threads, workers, pretrained)
        return
    if alpha is not None and partition != "dirichlet":
        raise UsageError(f"--alpha applies to --partition dirichlet only (got {partition})")
    names = method_names(methods)
    overrides = parse_params(param or [], names)
    dataset_options = {}
    for item in dataset_option or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--dataset-option {item}: expected KEY=VALUE, e.g. domain=noise")
        dataset_options[key.strip()] = parse_value(value.strip())
    fields: dict[str, Any] = dict(
        methods=tuple(resolve_method(name, overrides.get(name)) for name in names),
        dataset=dataset,
        data_root=data_root,
        protocol=protocol,
        target_domain=target_domain,
        transfer_datasets=tuple(
            w.strip() for w in (transfer_datasets or "").split(",") if w.strip()
        ),
        partition=partition,
        alpha=_default("alpha") if alpha is None else alpha,
        clients=clients,
        client_fraction=client_fraction,
        rounds=rounds,
        local_epochs=local_epochs,
        shots=shots,
        batch_size=batch_size,
        lr=lr,
        n_ctx=n_ctx,
        eval_every=eval_every,
        last_k=last_k,
        backbone=backbone,
        pretrained=pretrained,
        checkpoint=checkpoint,
        device=device,
        threads=threads,
        workers=workers,
        eps=parse_eps(eps),
        delta=delta,
        clip_norm=clip_norm,
        accountant=accountant,
        seeds=parse_int_list(seeds, "--seeds"),
        out=_out_folder(out),
        dataset_options=dataset_options,
        trust=trust,
        secure_noise=secure_noise,
        resume=resume,
        precision="fp32" if fp32 else "auto",
    )
    if cache_dir is not None:
        fields["cache_dir"] = cache_dir
    elif os.environ.get("FPL_BENCH_CACHE"):
        fields["cache_dir"] = Path(os.environ["FPL_BENCH_CACHE"])
    spec = build_spec_from_flags(fields)
    from fpl_bench.parallel import warm_workers_if_needed

    # the fork server's imports overlap with this process's own (fpl_bench/parallel.py)
    runs = len(spec.methods) * len(spec.eps) * len(spec.seeds)
    warm_workers_if_needed(workers=spec.workers, device=spec.device, runs=runs)
    specs = [spec]
    if tuned:
        from fpl_bench.tune import tuned_specs

        specs = tuned_specs(spec, storage=storage, prefix=study)  # one per (method, eps)
    elif storage is not None or study != "tune":
        raise UsageError("--storage and --study apply with --tuned only")

    import pandas as pd

    from fpl_bench.evaluate import PROTOCOL_METRICS
    from fpl_bench.experiment import build_methods, run_experiment

    for each in specs:
        build_methods(each)  # a learner x scheme pair that cannot work is refused here
    console = Console(stderr=False)
    err = Console(stderr=True)
    t0 = time.perf_counter()
    progress = TqdmProgress(specs)
    frames = []
    try:
        for each in specs:
            frames.append(
                run_experiment(
                    each,
                    log=lambda s: progress.write(s) if progress.bar else err.print(s, markup=False),
                    progress=progress,
                )
            )
    finally:
        progress.close()
    frame = pd.concat(frames, ignore_index=True)
    with_privacy = any(e is not None for e in spec.eps)
    seeds = f"{len(spec.seeds)} seed{'s' if len(spec.seeds) > 1 else ''}"
    title = f"accuracy % on {spec.dataset}, {spec.protocol}, mean ± std over {seeds}" + (
        f"; DP with {spec.trust} trust" if with_privacy else ""
    )
    console.print(title, highlight=False, markup=False)
    for table in format_table(frame, list(PROTOCOL_METRICS[spec.protocol]), with_privacy):
        console.print(table)
    console.print(
        f"wrote {Path(spec.out) / 'results.csv'} and MLflow runs "
        f"({math.ceil(time.perf_counter() - t0)} s)",
        highlight=False,
        markup=False,
    )


def _run_suite(
    name: str,
    out_text: str,
    dry_run: bool,
    data_root: Path | None,
    cache_dir: Path | None,
    device: str,
    threads: int | None,
    workers: int | None,
    pretrained: str | None,
) -> None:
    """`run --suite NAME [--dry-run]`: a grid from leaderboards/NAME.toml (fpl_bench/suite.py)."""
    from fpl_bench.suite import dry_run_rows, format_dry_run, load_suite, run_suite

    chosen = load_suite(name)
    out = Path("runs") / chosen.name if out_text == str(DEFAULT_OUT) else _out_folder(out_text)
    overrides: dict[str, Any] = {"device": device}
    if data_root is not None:
        overrides["data_root"] = data_root
    cache = cache_dir or (
        Path(os.environ["FPL_BENCH_CACHE"]) if os.environ.get("FPL_BENCH_CACHE") else None
    )
    if cache is not None:
        overrides["cache_dir"] = cache
    if threads is not None:
        overrides["threads"] = threads
    if workers is not None:
        overrides["workers"] = workers
    if pretrained is not None:
        overrides["pretrained"] = str(pretrained)
    if dry_run:
        typer.echo(format_dry_run(chosen, dry_run_rows(chosen, out, overrides=overrides)))
        return
    from tqdm import tqdm

    run_suite(
        chosen,
        out,
        log=lambda t: tqdm.write(t, file=sys.stderr),
        overrides=overrides,
        progress=TqdmProgress,
    )
    typer.echo(f"wrote {out / 'results.csv'}; `fpl-bench leaderboard --runs {out}` for the tables")


def _out_folder(text: str) -> Path:
    if not text.strip():
        raise UsageError("--out is empty; give a folder, e.g. --out runs/default")
    return Path(text)


def build_spec_from_flags(fields: dict[str, Any]) -> Any:
    """build_spec, with a bad field reported as the flag that sets it."""
    from fpl_bench.spec import FieldError, build_spec

    try:
        return build_spec(**fields)
    except FieldError as err:
        if err.field == "spec":  # a rule across fields: the message names them
            raise UsageError(err.message) from None
        flag = "--" + err.field.replace("_", "-")
        raise UsageError(f"{flag} {err.value}: {err.message}") from None


class TqdmProgress:
    """One progress bar for the whole job on stderr: total = every run's rounds, so its ETA is
    the job's; the description says run k of N and round r of R."""

    def __init__(self, specs: Any) -> None:
        from fpl_bench.learners import LEARNERS

        self.total = sum(
            sum(s.rounds if LEARNERS.get(m.learner).trains else 1 for m in s.methods)
            * len(s.eps)
            * len(s.seeds)
            for s in (specs if isinstance(specs, list) else [specs])
        )
        self.bar: Any = None
        self.label, self.rounds, self.done_before, self.index, self.runs = "", 0, 0, 0, 0

    def start_run(self, index: int, total: int, label: str, rounds: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(
                total=self.total, unit="round", file=sys.stderr, leave=False, disable=None
            )
        else:  # close out the previous run (a zero-shot run has no rounds: count it as one)
            self.bar.n = self.done_before = self.done_before + max(self.rounds, 1)
        self.index, self.runs, self.label, self.rounds = index, total, label, rounds
        self.advance(0)

    def advance(self, rounds_done: int) -> None:
        if self.bar is None:
            return
        self.bar.set_description_str(
            f"run {self.index}/{self.runs} {self.label} round {rounds_done}/{self.rounds}",
            refresh=False,
        )
        self.bar.n = self.done_before + rounds_done
        self.bar.refresh()

    def write(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@app.command("methods")
def methods_cmd(
    show_all: Annotated[
        bool,
        typer.Option("--all", help="Also list the learners, the schemes and the valid pairs."),
    ] = False,
) -> None:
    """List the named methods (presets); with --all, the learners, schemes and valid pairs."""
    from fpl_bench.catalog import learner_cards, list_presets, preset_cards, scheme_cards

    presets = preset_cards()
    for name in list_presets():
        card = presets[name]
        typer.echo(f"{name:10s} {card.learner + '@' + card.scheme:20s} {card.summary}")
    if not show_all:
        return
    from fpl_bench.method import all_pairs

    typer.echo("\nlearners:")
    for name, card in learner_cards().items():
        typer.echo(f"  {name:12s} {card.summary}")
    typer.echo("\nschemes:")
    for name, card in scheme_cards().items():
        typer.echo(f"  {name:12s} {card.summary}")
    typer.echo("\npairs (LEARNER@SCHEME runs with --methods):")
    for learner, scheme, problem in all_pairs():
        mark = "valid" if problem is None else f"refused: {problem}"
        typer.echo(f"  {learner + '@' + scheme:22s} {mark}")


@app.command("datasets")
def datasets_cmd() -> None:
    """List the dataset sources, one line each."""
    from fpl_bench.cards import dataset_cards

    cards = dataset_cards()
    width = max(map(len, cards))
    for name, card in cards.items():
        typer.echo(f"{name:{width}s} {'[' + card.kind + ']':11s} {card.summary}")


@app.command("pretrain-tiny")
def pretrain_tiny_cmd(
    out: Annotated[Path, typer.Option(help="Where to write the fp16 state dict.")],
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    n_images: Annotated[int, typer.Option(help="Synthetic training images.")] = 40000,
    minutes: Annotated[
        float | None, typer.Option(help="Stop the contrastive phase (1) after this many minutes.")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(help="torch CPU threads (default: all cores; the shipped file used 1)."),
    ] = None,
) -> None:
    """Reproduce the embedded tiny CLIP: contrastive pretraining on the synthetic source."""
    from fpl_bench.pretrain import pretrain_tiny

    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file path such as {out / 'tiny.pt'}")
    result = pretrain_tiny(out=out, seed=seed, n_images=n_images, minutes=minutes, threads=threads)
    typer.echo(f"wrote {out}: {result}")


def _register_commands() -> None:
    from fpl_bench.commands import register_all

    register_all(app)


_register_commands()


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM stops like Ctrl-C: runs marked KILLED, results kept


def main() -> None:
    """Console entry point: one-line errors with exit code 2 for bad input."""
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    try:
        result = app(standalone_mode=False)
    except UsageError as err:
        print(f"fpl-bench: error: {err}", file=sys.stderr)
        sys.exit(2)
    except _typer_click.NoArgsIsHelpError as err:  # bare `fpl-bench`: the help, exit 0
        print(err.format_message())
        sys.exit(0)
    except _CLICK_USAGE as err:
        message = " ".join(err.format_message().split())
        print(f"fpl-bench: error: {message} (see `fpl-bench --help`)", file=sys.stderr)
        sys.exit(2)
    except _CLICK_ERROR as err:
        print(f"fpl-bench: error: {' '.join(err.format_message().split())}", file=sys.stderr)
        sys.exit(2)
    except _CLICK_EXIT as err:
        sys.exit(err.exit_code)
    except (*_CLICK_ABORT, KeyboardInterrupt):
        result = 130
    if result == 130:  # typer turns Ctrl-C / SIGTERM into exit code 130
        print(
            "fpl-bench: interrupted; finished runs are kept in results.csv and the current run "
            "in checkpoints/; rerun the same command with --resume to continue",
            file=sys.stderr,
        )
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
