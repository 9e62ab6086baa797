"""``fpl-bench data ...``: look at datasets on disk (``check``) and at their cards (``info``).

    fpl-bench data check --data-root ~/data                 # every dataset card
    fpl-bench data check --data-root ~/data --dataset dtd   # one (repeatable)
    fpl-bench data info caltech101                          # layout, where to get it, citation

``check`` prints one report per dataset (found / missing / malformed, images per split, each
problem with its path, what to do) and exits with 2 when something needs fixing (see
``fpl_bench.data.check.exit_code``); a data root that does not exist is a one-line error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(
    no_args_is_help=True, help="Datasets on disk: check a data root, show cards."
)


@data_app.command("check")
def check_cmd(
    data_root: Annotated[Path, typer.Option(help="Folder holding the datasets (CoOp layout).")],
    dataset: Annotated[
        list[str] | None,
        typer.Option(
            help="Dataset card name or file (repeatable); default: all but the generic "
            "imagefolder, which reads the data root itself as its tree."
        ),
    ] = None,
    decode: Annotated[
        bool, typer.Option(help="Fully decode every image (slow) instead of checking headers.")
    ] = False,
    max_problems: Annotated[int, typer.Option(help="Problems listed per dataset.")] = 20,
) -> None:
    """Report, per dataset: found / missing / malformed, images per split, what to do."""
    from fpl_bench.data.check import check_data_root, exit_code

    reports = check_data_root(data_root, dataset or None, decode=decode)
    for report in reports:
        typer.echo("\n".join(report.lines(max_problems=max_problems)))
    code = exit_code(reports, named=bool(dataset))
    if code:
        raise typer.Exit(code)


@data_app.command("info")
def info_cmd(name: Annotated[str, typer.Argument(help="Dataset card name or file.")]) -> None:
    """Show a dataset card: classes, layout, where to obtain it, citation, defaults."""
    from fpl_bench.data.catalog import dataset_card

    card = dataset_card(name)
    typer.echo(f"{card.name} [{card.kind}] {card.summary}")
    classes = "as many as its class folders" if card.classes is None else card.classes
    typer.echo(f"classes: {classes}   default partition: {card.partition}")
    typer.echo(f"url: {card.url}")
    typer.echo(f"obtain: {card.obtain}")
    typer.echo("layout:")
    typer.echo("\n".join(f"  {line}" for line in card.layout.strip().splitlines()))
    typer.echo(f"citation: {card.citation}")
    if card.defaults:
        typer.echo(f"options: {card.defaults}")


def register(app: typer.Typer) -> None:
    """Add the ``data`` command group to the CLI."""
    app.add_typer(data_app, name="data")
