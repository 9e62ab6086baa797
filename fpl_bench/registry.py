"""Registries of learners and schemes, filled by discovering the modules of a package, and
by plugins: other installed packages' entry points.

timm's `_registry.py` idea: a decorator on the class records it, and the listing and the
factory read the same dict, so what is listed is what runs. Unlike a hand-kept module list,
`Registry.discover()` imports every module of its package: a new file is found, and an import
error inside one propagates (it is a bug, never a silently missing entry).

Plugins, as pytest's and Optuna's: a package declares entry points in the group
`fpl_bench.learners` or `fpl_bench.schemes`, each `NAME = "module:Class"`, a subclass of the
registry's base (`PromptLearner`, `Scheme`); the class's `card` attribute gives its card (a
TOML file beside its module, or a `ComponentCard`; read by `fpl_bench.catalog`):

    [project.entry-points."fpl_bench.learners"]       # the plugin's pyproject.toml
    tempered = "my_package.learners:Tempered"

They are loaded on the first lookup, never when the CLI is imported; a plugin that cannot be
loaded, is not such a class, or takes the name of one of fpl-bench's own is one UsageError line
naming the plugin and the package it came from.

    >>> from fpl_bench.learners import LEARNERS
    >>> "coop" in LEARNERS.names()
    True
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Generic, TypeVar

from fpl_bench.errors import UsageError

T = TypeVar("T", bound=type)

# A plugin's name is spelled in `--methods NAME@SCHEME` and `--param`: no '@', ',' or '.'.
PLUGIN_NAME = re.compile(r"[a-z][a-z0-9_]*")


class Registry(Generic[T]):
    """Name -> class for one kind of component ("learner", "scheme") living in one package,
    and the plugins of the entry-point `group` (subclasses of `base`, "module:Class")."""

    def __init__(
        self, kind: str, package: str, *, group: str | None = None, base: str | None = None
    ) -> None:
        self.kind = kind
        self.package = package
        self.group = group
        self.base = base
        self._classes: dict[str, Any] = {}
        self._discovered = False
        self._plugins: dict[str, Any] | None = None  # None: entry points not read yet

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

    def plugins(self) -> dict[str, Any]:
        """Name -> class of every plugin of the group, loaded once (fpl-bench's own modules
        are imported first only when there is a plugin, so a clash names the plugin)."""
        if self._plugins is None:
            found = [] if self.group is None else entry_points(group=self.group)
            found = sorted(found, key=lambda ep: ep.name)
            if found:
                self.discover()
            plugins: dict[str, Any] = {}
            for ep in found:
                plugins[ep.name] = self._load(ep, plugins)
            self._plugins = plugins
        return self._plugins

    def _load(self, ep: EntryPoint, loaded: dict[str, Any]) -> Any:
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "unknown package"
        where = f"plugin {self.kind} {ep.name!r} ({ep.value} from {dist})"
        if not PLUGIN_NAME.fullmatch(ep.name):
            raise UsageError(f"{where}: the name must be lowercase letters, digits and '_'")
        if ep.name in self._classes or ep.name in loaded:
            whose = "fpl-bench's own" if ep.name in self._classes else "another plugin's"
            raise UsageError(f"{where}: {ep.name!r} is already {whose} {self.kind}; rename it")
        try:
            cls = ep.load()
        except Exception as err:  # a broken plugin: one line naming it, not a traceback
            raise UsageError(
                f"{where} cannot be loaded: {type(err).__name__}: {err}; fix or uninstall "
                f"{dist.split()[0]}"
            ) from None
        module, _, attr = (self.base or "builtins:object").partition(":")
        base = getattr(importlib.import_module(module), attr)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise UsageError(f"{where}: {ep.value} is not a subclass of {attr}")
        if self._classes.get(ep.name) is cls:  # it registered itself on import
            del self._classes[ep.name]
        cls.name = ep.name
        return cls

    def names(self) -> list[str]:
        self.discover()
        return sorted({*self._classes, *self.plugins()})

    def get(self, name: str) -> Any:
        self.discover()
        found = self._classes.get(name) or self.plugins().get(name)
        if found is None:
            raise UsageError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return found
