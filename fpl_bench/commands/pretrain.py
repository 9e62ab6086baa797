"""``fpl-bench pretrain-tiny``: reproduce the embedded tiny CLIP (fpl_bench/pretrain.py), or
measure a checkpoint with ``--measure``.

    fpl-bench pretrain-tiny --out tiny.pt --minutes 30
    fpl-bench pretrain-tiny --out tiny.pt --measure         # zero-shot top-1 per domain
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from fpl_bench.errors import UsageError

ORDER = 2  # after `methods` and `datasets` in `fpl-bench --help` (fpl_bench/commands/__init__.py)


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
    measure: Annotated[
        bool,
        typer.Option(
            "--measure",
            help="Do not train: measure the checkpoint at --out (zero-shot top-1 per domain).",
        ),
    ] = False,
) -> None:
    """Reproduce the embedded tiny CLIP: contrastive pretraining on the synthetic source."""
    from fpl_bench.jobs import check_writable_folder
    from fpl_bench.pretrain import BATCH_SIZE, evaluate_checkpoint, pretrain_tiny

    if measure:
        if not out.is_file():
            raise UsageError(f"--out {out}: no such checkpoint to measure; omit --measure to train")
        evaluate_checkpoint(out, log=typer.echo)
        return

    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file path such as {out / 'tiny.pt'}")
    if n_images < BATCH_SIZE:
        raise UsageError(
            f"--n-images {n_images}: training needs at least one batch of {BATCH_SIZE} images; "
            f"give --n-images {BATCH_SIZE} or more (default 40000)"
        )
    if minutes is not None and not (minutes > 0 and math.isfinite(minutes)):
        raise UsageError(f"--minutes {minutes}: give a number of minutes > 0, e.g. --minutes 30")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads {threads}: give 1 or more")
    if seed < 0:
        raise UsageError(f"--seed {seed}: give an integer >= 0")
    check_writable_folder(out.parent, "--out's folder")  # before minutes of training
    result = pretrain_tiny(out=out, seed=seed, n_images=n_images, minutes=minutes, threads=threads)
    typer.echo(f"wrote {out}: {result}")


def register(app: typer.Typer) -> None:
    """Add the ``pretrain-tiny`` command to the CLI."""
    app.command("pretrain-tiny")(pretrain_tiny_cmd)
