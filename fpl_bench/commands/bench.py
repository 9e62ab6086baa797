"""``fpl-bench bench``: how fast the federated loop runs (fpl_bench/bench.py), not a test.

    fpl-bench bench                                  # all methods, eps none and 0.5, 10/50/100
    fpl-bench bench --methods dpfpl --clients 10,50 --json bench.json
    fpl-bench bench --methods promptfl --clients 100 --total-clients 1000   # scale
    fpl-bench bench --per-sample-loop --sequential-clients   # one reference ablation
    fpl-bench bench --compare-reference              # fast vs each switch off vs all off

Prints one line per measurement (seconds per round, client steps/s, samples/s, peak memory,
bytes held per client) and with --compare-reference a table of each switch's own contribution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fpl_bench import cli_options as opt
from fpl_bench.errors import UsageError

# --compare-reference runs 8 configs per cell, the reference one very slow: small defaults.
COMPARE_METHODS = "promptfl,dpfpl"
COMPARE_CLIENTS = "10"


@opt.spec_options("device", "batch_size", "precision")
def bench_cmd(
    *,
    methods: Annotated[
        str | None,
        typer.Option(
            help="Comma list of methods or 'all' (default all; promptfl,dpfpl "
            "with --compare-reference)."
        ),
    ] = None,
    eps: Annotated[str, typer.Option(help="eps values; 'none' = no DP.")] = "none,0.5",
    clients: Annotated[
        str | None,
        typer.Option(
            help="Clients per round, comma list (default 10,50,100; 10 with --compare-reference)."
        ),
    ] = None,
    total_clients: Annotated[
        int | None,
        typer.Option(
            help="Clients in the federation (default: --clients); a round samples "
            "--clients of them.",
            min=1,
        ),
    ] = None,
    backbones: Annotated[
        str | None,
        typer.Option(
            help="embedded and/or vit-b-16 (random weights); default embedded on a "
            "CPU, both on CUDA."
        ),
    ] = None,
    flags: opt.SpecFlags,
    threads: Annotated[
        int, typer.Option(help="CPU threads (per-core numbers by default).", min=1)
    ] = 1,
    rounds: Annotated[int, typer.Option(help="Rounds timed per measurement.", min=1)] = 1,
    samples_per_client: Annotated[
        int | None,
        typer.Option(
            help="Training examples per client (default 64; 32 with --compare-reference).",
            min=1,
        ),
    ] = None,
    local_epochs: Annotated[
        int | None,
        typer.Option(help="Local epochs per round (default 2; 1 with --compare-reference).", min=1),
    ] = None,
    no_feature_cache: Annotated[
        bool, typer.Option("--no-feature-cache", help="Encode images at every step.")
    ] = False,
    no_eot_truncation: Annotated[
        bool, typer.Option("--no-eot-truncation", help="Run the text tower's full length.")
    ] = False,
    no_shared_prefix: Annotated[
        bool,
        typer.Option("--no-shared-prefix", help="Every class runs SOS + context itself."),
    ] = False,
    per_sample_loop: Annotated[
        bool, typer.Option("--per-sample-loop", help="DP: one backward per sample.")
    ] = False,
    sequential_clients: Annotated[
        bool, typer.Option("--sequential-clients", help="A step's clients one at a time.")
    ] = False,
    autograd_backward: Annotated[
        bool,
        typer.Option(
            "--autograd-backward",
            help="DP: the text tower's per-sample backward by autograd (vmapped), not by hand.",
        ),
    ] = False,
    compare_reference: Annotated[
        bool,
        typer.Option(
            "--compare-reference",
            help="Fast config, each switch off alone, and all off; print each switch's share.",
        ),
    ] = False,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the records to this JSON file.")
    ] = None,
) -> None:
    """Seconds per round, client steps/s, samples/s and peak memory per method, eps, clients."""
    import torch

    from fpl_bench.bench import (
        Config,
        Sizes,
        contributions,
        format_contributions,
        format_records,
        reference_configs,
        run_bench,
        with_speedups,
        write_json,
    )
    from fpl_bench.catalog import method_names, resolve_method
    from fpl_bench.compute import fast_precision, resolve_precision
    from fpl_bench.jobs import check_writable_folder
    from fpl_bench.method import build_method
    from fpl_bench.prepare import resolve_device
    from fpl_bench.spec import parse_eps, parse_int_list

    names = method_names(methods or (COMPARE_METHODS if compare_reference else "all"))
    spec = opt.spec_from_flags(  # the methods' pairs, eps, device and batch size checked
        flags, methods=tuple(resolve_method(name) for name in names), eps=parse_eps(eps)
    )
    fp32 = spec.precision == "fp32"
    ablations = (
        no_feature_cache,
        no_eot_truncation,
        no_shared_prefix,
        per_sample_loop,
        sequential_clients,
        fp32,
        autograd_backward,
    )
    if compare_reference and any(ablations):
        raise UsageError("--compare-reference measures every switch itself; drop the --no-* flags")
    if json_path is not None:
        if json_path.is_dir():
            raise UsageError(f"--json {json_path} is a folder; give a file such as bench.json")
        check_writable_folder(json_path.parent, "--json's folder")  # before minutes of timing
    torch_device = resolve_device(spec.device)
    torch.set_num_threads(threads)
    built = [build_method(choice) for choice in spec.methods]
    counts = parse_int_list(
        clients or (COMPARE_CLIENTS if compare_reference else "10,50,100"), "--clients"
    )
    if not counts or min(counts) < 1:
        raise UsageError("--clients: give positive counts, e.g. --clients 10,50")
    if total_clients is not None and total_clients < max(counts):
        raise UsageError(f"--total-clients {total_clients} is below --clients {max(counts)}")
    default_backbones = "embedded,vit-b-16" if torch_device.type == "cuda" else "embedded"
    chosen = [b.strip() for b in (backbones or default_backbones).split(",") if b.strip()]
    unknown = [b for b in chosen if b not in ("embedded", "vit-b-16")]
    if unknown:
        raise UsageError(f"--backbones {unknown[0]}: known backbones are embedded, vit-b-16")
    sizes = Sizes(
        samples_per_client=samples_per_client or (32 if compare_reference else 64),
        batch_size=spec.batch_size,
        local_epochs=local_epochs or (1 if compare_reference else 2),
        rounds=rounds,
    )
    native = fast_precision(torch_device) == "bf16"
    if compare_reference:

        def configs(eps_value: float | None) -> list[Config]:
            return reference_configs(private=eps_value is not None, bf16_native=native)

    else:
        configs = [
            Config(
                feature_cache=not no_feature_cache,
                eot_truncation=not no_eot_truncation,
                shared_prefix=not no_shared_prefix,
                vmap_per_sample=not per_sample_loop,
                batch_clients=not sequential_clients,
                bf16=not fp32,
                hand_backward=not autograd_backward,
            )
        ]
    typer.echo(format_records([]).splitlines()[0])
    records = run_bench(
        built,
        backbones=chosen,
        eps_list=list(spec.eps),
        client_counts=counts,
        configs=configs,
        sizes=sizes,
        device=torch_device,
        total_clients=total_clients,
        log=typer.echo,
        precision=resolve_precision(spec.precision, torch_device),
    )
    if compare_reference:
        records = with_speedups(records)
        typer.echo("")
        typer.echo("slowdown when one switch is off (its own contribution); all off / all on:")
        typer.echo(format_contributions(contributions(records)))
    if json_path is not None:
        write_json(records, json_path)
        typer.echo(f"wrote {json_path}")


def register(app: typer.Typer) -> None:
    """Add the ``bench`` command to the CLI."""
    app.command("bench")(bench_cmd)
