"""The sub-commands of `fpl-bench`, the core `run` among them.

Each module here defines `register(app: typer.Typer) -> None`, which adds its commands to the
CLI's app; `fpl_bench.cli` discovers the modules (no hand-kept list), so a new file is a new
command group. Modules import their heavy dependencies inside the command functions, so that
`fpl-bench --help` and a mistyped command stay fast.

Order in `fpl-bench --help`: commands are listed in the order they are registered (typer lists
command groups, such as `data`, after the single commands). Modules register by their optional
module-level `ORDER` (an int, lower first; `DEFAULT_ORDER` when absent), then by name: `run`
(0) comes first, then `methods` and `datasets` (catalog, 1), `pretrain-tiny` (pretrain, 2), then
the rest alphabetically.
"""

from __future__ import annotations

import importlib
import pkgutil

import typer

DEFAULT_ORDER = 100


def register_all(app: typer.Typer) -> None:
    """Import every module of this package and let it add its commands to `app`, in the order
    of their `ORDER` hints, then their names."""
    modules = [
        importlib.import_module(f"{__name__}.{info.name}")
        for info in pkgutil.iter_modules(__path__)
    ]
    ordered = sorted(
        modules, key=lambda m: (getattr(m, "ORDER", DEFAULT_ORDER), m.__name__.rsplit(".", 1)[1])
    )
    for module in ordered:
        module.register(app)
