"""Source options (a card's ``[defaults]`` overridden by ``--dataset-option``): checked once.

>>> check_options("cifar10", {"seed": 1}, {"seed": 0, "val_fraction": 0.1})
{'seed': 1, 'val_fraction': 0.1}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fpl_bench.errors import UsageError

__all__ = ["check_options"]


def check_options(
    dataset: str, options: Mapping[str, Any], known: Mapping[str, Any]
) -> dict[str, Any]:
    """``known`` (name -> default) updated by ``options``; an unknown name lists the known ones.

    A number option takes a number of its default's kind (an integer for an integer default);
    a ``seed`` must be a non-negative integer.
    """
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UsageError(
            f"dataset {dataset} has no option {unknown[0]!r}; "
            f"options: {', '.join(sorted(known)) or 'none'}"
        )
    for name, value in options.items():  # a number option takes a number (TOML-typed)
        default = known[name]
        if isinstance(default, bool) or not isinstance(default, int | float):
            continue
        wanted = "an integer" if isinstance(default, int) else "a finite number"
        numeric = (int,) if isinstance(default, int) else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric) or not math.isfinite(value):
            raise UsageError(
                f"dataset {dataset}: {name}={value!r} must be {wanted}, e.g. {name}={default!r}"
            )
    merged = {**known, **options}
    seed = merged.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"dataset {dataset}: seed={seed!r} must be an integer >= 0")
    return merged
