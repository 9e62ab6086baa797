"""Command-line options that several sub-commands take, declared once.

def command(data_root: DataRoot = None, cache_dir: CacheDir = None) -> None:
    cache = cache_dir_or_env(cache_dir)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

CACHE_ENV = "FPL_BENCH_CACHE"

DataRoot = Annotated[Path | None, typer.Option(help="Folder holding the dataset files.")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
CacheDir = Annotated[
    Path | None,
    typer.Option(help=f"Feature/data cache (default ${CACHE_ENV}, else ~/.cache/fpl-bench)."),
]


def cache_dir_or_env(cache_dir: Path | None) -> Path | None:
    """--cache-dir when given, else $FPL_BENCH_CACHE when set, else None (the spec's default)."""
    if cache_dir is not None:
        return cache_dir
    return Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else None
