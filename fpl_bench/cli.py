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

from fpl_bench.errors import UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Benchmark federated prompt-learning methods on CLIP under differential privacy.",
)

DEFAULT_OUT = Path("runs/default")


def _default(field: str) -> Any:
    """The ExperimentSpec default of `field`, so the CLI and the spec cannot disagree."""
    from fpl_bench.spec import ExperimentSpec

    return ExperimentSpec.model_fields[field].default


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_params(items: list[str]) -> dict[str, dict[str, Any]]:
    """['dpfpl.rank=4', 'fedpgp.mu=0.5'] -> {'dpfpl': {'rank': 4}, 'fedpgp': {'mu': 0.5}}."""
    from fpl_bench.methods.registry import resolve_method_name

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, option = key.partition(".")
        if not sep or not dot or not option:
            raise UsageError(
                f"--param {item}: expected METHOD.OPTION=VALUE, e.g. --param dpfpl.rank=4"
            )
        out.setdefault(resolve_method_name(method), {})[option.strip()] = _parse_value(
            value.strip()
        )
    return out


def _methods_arg(text: str) -> tuple[str, ...]:
    from fpl_bench.methods.registry import list_methods, resolve_method_name

    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise UsageError("--methods is empty; e.g. --methods all or --methods coop,promptfl")
    if words == ["all"]:
        return tuple(list_methods())
    return tuple(dict.fromkeys(resolve_method_name(w) for w in words))


SHORT = {
    "local_acc": "local",
    "neighbor_acc": "neighbor",
    "base_acc": "base",
    "novel_acc": "novel",
    "hm": "HM",
}


def format_table(frame: Any, metrics: list[str], with_privacy: bool) -> Any:
    """A rich Table: one row per (eps, method), mean ± std over seeds of each metric (in %)."""
    from rich.table import Table

    table = Table(title="accuracy % (mean ± std over seeds)", title_justify="left")
    table.add_column("eps", justify="right")
    table.add_column("method")
    for m in metrics:
        table.add_column(SHORT.get(m, m), justify="right")
    if with_privacy:
        table.add_column("eps_spent", justify="right")
    for (eps, method), group in frame.groupby(["eps", "method"], sort=False):
        cells = [str(eps), method]
        for m in metrics:
            values = group[m].astype(float) * 100
            std = values.std(ddof=0) if len(values) > 1 else 0.0
            cells.append("—" if values.isna().all() else f"{values.mean():.1f}±{std:.1f}")
        if with_privacy:
            spent = group["eps_spent"].astype(float)
            cells.append("—" if spent.isna().all() else f"{spent.max():.3f}")
        table.add_row(*cells)
    return table


@app.command()
def run(
    methods: Annotated[str, typer.Option(help="Comma list of methods, or 'all'.")] = "all",
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
    domain: Annotated[str | None, typer.Option(help="Synthetic background domain.")] = None,
    protocol: Annotated[str, typer.Option(help="base2novel or personalized.")] = _default(
        "protocol"
    ),
    partition: Annotated[str, typer.Option(help="pathological, dirichlet or iid.")] = _default(
        "partition"
    ),
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration.")] = _default("alpha"),
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
        str, typer.Option(help="open_clip model name (default: the embedded tiny CLIP).")
    ] = _default("backbone"),
    pretrained: Annotated[
        str | None, typer.Option(help="open_clip pretrained tag, e.g. openai.")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Local checkpoint (state dict) for --backbone.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = _default("device"),
    threads: Annotated[
        int | None,
        typer.Option(help="CPU threads for training (default: 1 for the embedded model)."),
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option(help="Method option METHOD.OPTION=VALUE (repeatable).")
    ] = None,
    rank: Annotated[int | None, typer.Option(help="DP-FPL / FedPGP low-rank size.")] = None,
    no_residual: Annotated[
        bool, typer.Option("--no-residual", help="DP-FPL without the residual (DP-LoRA).")
    ] = False,
    out: Annotated[
        Path, typer.Option(help="Output folder (results.csv, mlflow.db, partitions).")
    ] = DEFAULT_OUT,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Feature/data cache (default ~/.cache/fpl-bench).")
    ] = None,
) -> None:
    """Run methods on a dataset at a privacy budget; print the table and write DIR/results.csv."""
    from rich.console import Console

    from fpl_bench.spec import build_spec, parse_eps, parse_int_list

    method_options = parse_params(param or [])
    if rank is not None:
        for name in ("dpfpl", "fedpgp"):
            method_options.setdefault(name, {})["rank"] = rank
    if no_residual:
        method_options.setdefault("dpfpl", {})["residual"] = False
    fields: dict[str, Any] = dict(
        methods=_methods_arg(methods),
        method_options=method_options,
        dataset=dataset,
        data_root=data_root,
        protocol=protocol,
        partition=partition,
        alpha=alpha,
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
        eps=parse_eps(eps),
        delta=delta,
        clip_norm=clip_norm,
        accountant=accountant,
        seeds=parse_int_list(seeds, "--seeds"),
        out=out,
        dataset_options={"domain": domain} if domain else {},
    )
    if cache_dir is not None:
        fields["cache_dir"] = cache_dir
    elif os.environ.get("FPL_BENCH_CACHE"):
        fields["cache_dir"] = Path(os.environ["FPL_BENCH_CACHE"])
    spec = build_spec(**fields)
    _check_methods_accept(spec)

    from tqdm import tqdm

    from fpl_bench.evaluate import PROTOCOL_METRICS
    from fpl_bench.experiment import run_experiment

    console = Console(stderr=False)
    err = Console(stderr=True)
    t0 = time.perf_counter()
    frame = run_experiment(
        spec,
        log=lambda s: err.print(s, highlight=False),
        progress_factory=lambda label, total: tqdm(
            total=total, desc=label, unit="round", leave=False, file=sys.stderr, disable=None
        ),
    )
    with_privacy = any(e is not None for e in spec.eps)
    console.print(format_table(frame, list(PROTOCOL_METRICS[spec.protocol]), with_privacy))
    console.print(
        f"wrote {Path(spec.out) / 'results.csv'} and MLflow runs "
        f"({math.ceil(time.perf_counter() - t0)} s)",
        highlight=False,
    )


def _check_methods_accept(spec: Any) -> None:
    """Validate method options before any work starts (unknown option -> UsageError)."""
    from fpl_bench.experiment import method_options
    from fpl_bench.methods.registry import build_method

    for name in spec.methods:
        build_method(name, method_options(spec, name))


@app.command("methods")
def methods_cmd() -> None:
    """List the registered methods, one line each."""
    from fpl_bench.cards import method_cards
    from fpl_bench.methods.registry import list_methods

    cards = method_cards()
    for name in list_methods():
        card = cards.get(name)
        typer.echo(f"{name:10s} {card.summary if card else ''}")


@app.command("datasets")
def datasets_cmd() -> None:
    """List the dataset sources, one line each."""
    from fpl_bench.cards import dataset_cards

    for name, card in dataset_cards().items():
        typer.echo(f"{name:10s} [{card.kind}] {card.summary}")


@app.command("pretrain-tiny")
def pretrain_tiny_cmd(
    out: Annotated[Path, typer.Option(help="Where to write the fp16 state dict.")],
    seed: Annotated[int, typer.Option(help="Training seed.")] = 0,
    n_images: Annotated[int, typer.Option(help="Synthetic training images.")] = 40000,
    minutes: Annotated[float | None, typer.Option(help="Stop after this many minutes.")] = None,
) -> None:
    """Reproduce the embedded tiny CLIP: contrastive pretraining on the synthetic source."""
    from fpl_bench.pretrain import pretrain_tiny

    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file path such as {out / 'tiny.pt'}")
    result = pretrain_tiny(out=out, seed=seed, n_images=n_images, minutes=minutes)
    typer.echo(f"wrote {out}: {result}")


def main() -> None:
    """Console entry point: one-line errors with exit code 2 for bad input."""
    try:
        result = app(standalone_mode=False)
    except UsageError as err:
        print(f"fpl-bench: error: {err}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.UsageError as err:
        print(f"fpl-bench: error: {err.format_message()}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Abort:
        print("fpl-bench: aborted", file=sys.stderr)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
