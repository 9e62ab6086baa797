"""Registries of learners and schemes, filled by discovering the modules of a package.

timm's `_registry.py` idea: a decorator on the class records it, and the listing and the
factory read the same dict, so what is listed is what runs. Unlike a hand-kept module list,
`Registry.discover()` imports every module of its package: a new file is found, and an import
error inside one propagates (it is a bug, never a silently missing entry).

    >>> from fpl_bench.learners import LEARNERS
    >>> "coop" in LEARNERS.names()
    True
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from fpl_bench.errors import UsageError

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Name -> class for one kind of component ("learner", "scheme") living in one package."""

    def __init__(self, kind: str, package: str) -> None:
        self.kind = kind
        self.package = package
        self._classes: dict[str, Any] = {}
        self._discovered = False

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: record the class under `name` (the module's and card's stem)."""

        def wrap(cls: T) -> T:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            cls.name = name
            self._classes[name] = cls
            return cls

        return wrap

    def discover(self) -> None:
        """Import every module of the package once (skipping `_private` ones such as `_base`)."""
        if self._discovered:
            return
        package = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")
        self._discovered = True

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._classes)

    def get(self, name: str) -> Any:
        self.discover()
        if name not in self._classes:
            raise UsageError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._classes[name]
