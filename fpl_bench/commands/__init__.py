"""Sub-commands of `fpl-bench` that live beside the core `run` command.

Each module here defines `register(app: typer.Typer) -> None`, which adds its commands to the
CLI's app; `fpl_bench.cli` discovers the modules (no hand-kept list), so a new file is a new
command group. Modules import their heavy dependencies inside the command functions, so that
`fpl-bench --help` and a mistyped command stay fast.
"""

from __future__ import annotations

import importlib
import pkgutil

import typer


def register_all(app: typer.Typer) -> None:
    """Import every module of this package and let it add its commands to `app`."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(app)
