"""One registry of methods: `fpl-bench methods` lists it and the driver builds from it.

`@register_method("coop")` on a method class records it; the card `methods/coop.toml` supplies
the defaults of its fields. What is listed is what runs (timm's `_registry.py` idea).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from fpl_bench.errors import UsageError

_METHODS: dict[str, type] = {}
_ALIASES: dict[str, str] = {}
_MODULES = ("zeroshot", "coop", "promptfl", "fedotp", "fedpgp", "dpfpl")
_loaded = False


def register_method(name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[type], type]:
    """Class decorator: register a method class under `name` (and older `aliases`)."""

    def wrap(cls: type) -> type:
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        _METHODS[name] = cls
        for alias in aliases:
            _ALIASES[alias] = name
        return cls

    return wrap


def _load() -> None:
    global _loaded
    if not _loaded:
        for module in _MODULES:
            importlib.import_module(f"fpl_bench.methods.{module}")
        _loaded = True


def list_methods() -> list[str]:
    """Registered method names, in the order the benchmark reports them (`_MODULES` order)."""
    _load()
    order = {name: i for i, name in enumerate(_MODULES)}
    return sorted(_METHODS, key=lambda name: order.get(name, len(order)))


def resolve_method_name(name: str) -> str:
    """Canonical name for `name` or an alias; UsageError naming the known methods."""
    _load()
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _METHODS:
        raise UsageError(f"unknown method {name!r}; known: {', '.join(list_methods())}")
    return key


def method_class(name: str) -> type:
    return _METHODS[resolve_method_name(name)]


def hyperparameters(name: str) -> dict[str, Any]:
    """The method's hyperparameters and their code defaults (its dataclass fields)."""
    cls = method_class(name)
    return {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }


def build_method(name: str, options: Mapping[str, Any] | None = None) -> Any:
    """Instantiate a method with `options` over its defaults; unknown options are a UsageError."""
    cls = method_class(name)
    known = hyperparameters(name)
    options = dict(options or {})
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UsageError(
            f"method {cls.name!r} has no option {unknown[0]!r}; "
            f"its options: {', '.join(known) or 'none'}"
        )
    try:
        return cls(**options)
    except (TypeError, ValueError) as err:
        raise UsageError(f"method {cls.name!r}: {err}") from None
