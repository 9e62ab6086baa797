"""Dataset sources behind one call: a card names the kind, `load_source` returns the splits.

Kinds today: `synthetic` (the embedded procedurally generated source). Real folders (CoOp layout
with split_zhou_*.json, CIFAR, domains) plug in here as further kinds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fpl_bench.cards import DatasetCard
from fpl_bench.data.synthetic import SyntheticSplits, load_synthetic
from fpl_bench.errors import UsageError

Splits = SyntheticSplits  # classnames, train/val/test ImageSets, fingerprint


def _synthetic(root: Path | None, options: Mapping[str, Any], cache_dir: Path) -> Splits:
    known = {"n_train_per_class", "n_val_per_class", "n_test_per_class", "domain", "seed"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UsageError(
            f"synthetic dataset has no option {unknown[0]!r}; options: {', '.join(sorted(known))}"
        )
    return load_synthetic(cache_dir=cache_dir / "data", **options)


LOADERS: dict[str, Callable[[Path | None, Mapping[str, Any], Path], Splits]] = {
    "synthetic": _synthetic,
}


def load_source(
    card: DatasetCard, *, root: Path | None, options: Mapping[str, Any], cache_dir: Path
) -> Splits:
    """Load the dataset a card describes, with `options` over the card's defaults."""
    merged = {**card.defaults, **options}
    if root is not None and not Path(root).is_dir():
        raise UsageError(f"--data-root {root}: no such folder; {card.obtain}")
    return LOADERS[card.kind](root, merged, cache_dir)
