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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


class DatasetCard(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    kind: Literal["synthetic"]
    summary: str
    obtain: str
    defaults: dict[str, Any] = Field(default_factory=dict)


def cards_root() -> Path:
    """The folder holding `methods/` and `datasets/`: the checkout, or the installed share dir."""
    for root in (Path(__file__).resolve().parents[1], Path(sys.prefix) / "share" / "fpl-bench"):
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


@cache
def dataset_cards() -> dict[str, DatasetCard]:
    return _load("datasets", DatasetCard)


def dataset_card(name: str) -> DatasetCard:
    cards = dataset_cards()
    if name not in cards:
        raise UsageError(f"unknown dataset {name!r}; known: {', '.join(cards)}")
    return cards[name]
