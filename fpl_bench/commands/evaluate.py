"""`fpl-bench eval`: re-evaluate a finished run's saved prompts.

    fpl-bench eval --prompts runs/default/prompts/dpfpl-synthetic-server-epsnone-seed0-<hash>.safetensors
    fpl-bench eval --prompts FILE --protocol personalized

The run is rebuilt from the configuration stored in the file (method and options, data,
partition seed, backbone); its parameters are loaded and evaluated on the test split
(fpl_bench/saved_prompts.py). Under the run's own protocol the numbers are those of the run's
last evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fpl_bench.cli_options import CacheDir, DataRoot, Device, cache_dir_or_env


def evaluate(
    prompts: Annotated[
        Path, typer.Option(help="A run's prompts file: OUT/prompts/<run>.safetensors.")
    ],
    protocol: Annotated[
        str | None,
        typer.Option(
            help="Evaluate under this protocol instead of the run's own (personal prompts are "
            "matched to clients by index)."
        ),
    ] = None,
    data_root: DataRoot = None,
    cache_dir: CacheDir = None,
    device: Device = "auto",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the metrics as one JSON object.")
    ] = False,
) -> None:
    """Evaluate saved prompts: the mean over clients of each metric of the protocol."""
    from fpl_bench.saved_prompts import evaluate_saved, load_prompts, saved_spec

    saved = load_prompts(prompts)
    cache = cache_dir_or_env(cache_dir)
    spec = saved_spec(saved, protocol=protocol, data_root=data_root, cache_dir=cache, device=device)
    metrics = evaluate_saved(saved, spec, log=lambda text: None)
    if as_json:
        typer.echo(json.dumps(metrics, sort_keys=True))
        return
    key = saved.key
    typer.echo(
        f"{key['method']} on {spec.dataset}, {spec.protocol} (trained: {key['protocol']}, "
        f"eps {key['eps']}, seed {key['seed']}, {key['trust']} trust)"
    )
    for metric, value in metrics.items():
        typer.echo(f"  {metric:16s} {100 * value:.2f}")


def register(app: typer.Typer) -> None:
    """Add `eval` to the CLI."""
    app.command("eval")(evaluate)
