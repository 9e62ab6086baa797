"""Command-line options that several sub-commands take, declared once.

def command(data_root: DataRoot = None, cache_dir: CacheDir = None) -> None:
    cache = cache_dir_or_env(cache_dir)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from fpl_bench.errors import UsageError

CACHE_ENV = "FPL_BENCH_CACHE"

DataRoot = Annotated[Path | None, typer.Option(help="Folder holding the dataset files.")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
# What `run` and `tune` both take, with one help text each (defaults: `spec_default`).
Dataset = Annotated[
    str,
    typer.Option(help="Dataset card name (see `fpl-bench datasets`) or card file PATH.toml."),
]
DatasetOption = Annotated[
    list[str] | None,
    typer.Option(help="Dataset option KEY=VALUE (repeatable), e.g. domain=noise."),
]
Protocol = Annotated[
    str,
    typer.Option(
        help="base2novel, personalized, multi-domain, cross-domain or cross-dataset "
        "(with --transfer-datasets)."
    ),
]
Partition = Annotated[str, typer.Option(help="pathological, dirichlet, iid or by_domain.")]
Clients = Annotated[int, typer.Option(help="Number of clients.")]
Shots = Annotated[int, typer.Option(help="Training shots per class per client (0 = all).")]
Trust = Annotated[
    str,
    typer.Option(
        help="Trust model under DP: server (trusted aggregator adds the noise to shared "
        "parameters) or client (every client noises everything it sends)."
    ),
]
Delta = Annotated[float, typer.Option(help="Target delta.")]
Accountant = Annotated[
    str, typer.Option(help="Noise calibration: rdp, prv, or paper (DP-FPL closed form).")
]
Backbone = Annotated[
    str,
    typer.Option(
        help="open_clip model name or a model-config .json (default: the embedded tiny CLIP)."
    ),
]
Pretrained = Annotated[
    str | None,
    typer.Option(
        help="open_clip tag (e.g. openai), a weights file (.pt/.safetensors, OpenAI's "
        "TorchScript .pt), or none (random weights)."
    ),
]
Checkpoint = Annotated[
    Path | None, typer.Option(help="Local checkpoint (state dict) for --backbone.")
]


def spec_default(field: str) -> Any:
    """The ExperimentSpec default of `field`, so a command and the spec cannot disagree."""
    from fpl_bench.spec import ExperimentSpec

    return ExperimentSpec.model_fields[field].default


Alpha = Annotated[
    float | None,
    typer.Option(
        help=f"Dirichlet concentration (--partition dirichlet; default {spec_default('alpha')})."
    ),
]


def alpha_for(partition: str, alpha: float | None) -> float:
    """The spec's alpha from `--alpha` (None: not given): it applies to --partition dirichlet
    only; not given, the spec's default."""
    if alpha is not None and partition != "dirichlet":
        raise UsageError(f"--alpha applies to --partition dirichlet only (got {partition})")
    return spec_default("alpha") if alpha is None else alpha


def dataset_options(items: list[str] | None) -> dict[str, Any]:
    """`--dataset-option KEY=VALUE` items as a dict, each value parsed as the catalog parses
    card values (numbers, booleans, lists)."""
    from fpl_bench.catalog import parse_value

    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--dataset-option {item}: expected KEY=VALUE, e.g. domain=noise")
        options[key.strip()] = parse_value(value.strip())
    return options


CacheDir = Annotated[
    Path | None,
    typer.Option(help=f"Feature/data cache (default ${CACHE_ENV}, else ~/.cache/fpl-bench)."),
]


def cache_dir_or_env(cache_dir: Path | None) -> Path | None:
    """--cache-dir when given, else $FPL_BENCH_CACHE when set, else None (the spec's default)."""
    if cache_dir is not None:
        return cache_dir
    return Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else None
