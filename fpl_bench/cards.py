"""Declarative cards: `methods/<name>.toml` and `datasets/<name>.toml` (configs as data).

A method card holds the paper reference, the defaults of the method's hyperparameters and the
search space Optuna explores; a dataset card says what the source is and how to obtain it. Cards
are read once and keyed by file stem. A card with a missing or unknown field is an error, never
a skip (open_clip skips; we do not).
"""

from __future__ import annotations

import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Dataset cards live with the data sources (one model per source kind); re-exported here.
from fpl_bench.data.catalog import DatasetCard as DatasetCard
from fpl_bench.data.catalog import dataset_card as dataset_card
from fpl_bench.data.catalog import dataset_cards as dataset_cards
from fpl_bench.errors import UsageError


class SearchRange(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None


class MethodCard(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    summary: str
    paper: str
    reference: str
    defaults: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, SearchRange] = Field(default_factory=dict)


def cards_root() -> Path:
    """The folder holding `methods/` and `datasets/`: the checkout, or the installed share dir."""
    import site

    candidates = [Path(__file__).resolve().parents[1]]  # a checkout (or editable install)
    # a wheel installs the cards as data files under <prefix>/share/fpl-bench
    for prefix in (sys.prefix, sys.base_prefix, site.getuserbase()):
        candidates.append(Path(prefix) / "share" / "fpl-bench")
    for root in candidates:
        if (root / "methods").is_dir() and (root / "datasets").is_dir():
            return root
    raise UsageError(
        "cannot find the methods/ and datasets/ cards; install with `pip install -e .`"
    )


def _load(folder: str, model: type[BaseModel]) -> dict[str, Any]:
    cards = {}
    for path in sorted((cards_root() / folder).glob("*.toml")):
        try:
            card = model.model_validate(tomllib.loads(path.read_text()))
        except (tomllib.TOMLDecodeError, ValidationError) as err:
            first = str(err).splitlines()
            raise UsageError(f"bad card {path}: {' '.join(first[:3])}") from None
        if card.name != path.stem:
            raise UsageError(f"bad card {path}: name {card.name!r} differs from the file stem")
        cards[path.stem] = card
    return cards


@cache
def method_cards() -> dict[str, MethodCard]:
    return _load("methods", MethodCard)
