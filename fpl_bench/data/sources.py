"""Dataset sources behind one call: a card names the kind, ``load_source`` returns the splits.

Kinds (``card.source.kind``; see ``fpl_bench.data.catalog``):

    synthetic  generated in memory, 32x32 (``synthetic.py``); ``domain`` may name several
               backgrounds ("plain,noise" or "all"), each then a domain
    coop       CoOp folder + split_zhou_*.json, file-backed (``coop_layout.py``)
    aircraft   FGVC-Aircraft's variants.txt + images_variant_*.txt, file-backed (``aircraft.py``)
    imagenet   ImageNet class folders + CoOp's classnames.txt, file-backed (``imagenet.py``)
    cifar      torchvision's CIFAR-10/100 pickles, read safely, in memory (``cifar.py``)
    domains    one folder per domain with class sub-folders, file-backed (``domains.py``)
    imagefolder  any class-per-folder tree (ImageFolder layout), file-backed (``imagefolder.py``)

Every kind returns ``Splits`` (``imageset.py``): class names, train/val/test ``ImageSet``s
(in memory or file-backed, each image with a domain id), the domain names and a fingerprint.
Nothing is ever downloaded: a folder that is not there is a UsageError that says where to get it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fpl_bench.data.aircraft import load_aircraft
from fpl_bench.data.catalog import DatasetCard
from fpl_bench.data.cifar import load_cifar
from fpl_bench.data.coop_layout import load_coop
from fpl_bench.data.domains import concat_domains, load_domains
from fpl_bench.data.imagefolder import load_imagefolder
from fpl_bench.data.imagenet import load_imagenet
from fpl_bench.data.imageset import ImageSet, Splits
from fpl_bench.data.options import check_options
from fpl_bench.data.synthetic import DOMAINS, load_synthetic
from fpl_bench.errors import UsageError

__all__ = ["LOADERS", "ImageSet", "Splits", "load_source"]

_SYNTHETIC_OPTIONS = {
    "n_train_per_class": 64,
    "n_val_per_class": 8,
    "n_test_per_class": 32,
    "domain": "dusk",
    "seed": 0,
}


def _synthetic_domains(choice: Any) -> list[str]:
    if choice == "all":
        return list(DOMAINS)
    names = choice.split(",") if isinstance(choice, str) else choice
    if not isinstance(names, list | tuple) or not names or len(set(names)) != len(names):
        raise UsageError(
            f"synthetic domain={choice!r}: give one of {', '.join(DOMAINS)}, several joined by "
            "commas, or 'all'"
        )
    return list(names)


def _synthetic(
    card: DatasetCard, root: Path | None, options: Mapping[str, Any], cache_dir: Path
) -> Splits:
    opts = check_options(card.name, options, _SYNTHETIC_OPTIONS)
    domains = _synthetic_domains(opts.pop("domain"))
    parts = [load_synthetic(cache_dir=cache_dir / "data", domain=d, **opts) for d in domains]
    return parts[0] if len(parts) == 1 else concat_domains(parts)


def _needs_root(
    load: Callable[[DatasetCard, Path, Mapping[str, Any], Path], Splits],
) -> Callable[[DatasetCard, Path | None, Mapping[str, Any], Path], Splits]:
    def wrapped(
        card: DatasetCard, root: Path | None, options: Mapping[str, Any], cache_dir: Path
    ) -> Splits:
        if root is None:
            raise UsageError(
                f"dataset {card.name} reads files: pass --data-root DIR (the folder holding "
                f"{card.layout.splitlines()[0].strip()}); {card.obtain}"
            )
        return load(card, Path(root), options, cache_dir)

    return wrapped


def _cacheless(
    load: Callable[[DatasetCard, Path, Mapping[str, Any]], Splits],
) -> Callable[[DatasetCard, Path, Mapping[str, Any], Path], Splits]:
    """A file loader that stores nothing derived (its split is given, or recomputed each time)."""
    return lambda card, root, options, cache_dir: load(card, root, options)


LOADERS: dict[str, Callable[[DatasetCard, Path | None, Mapping[str, Any], Path], Splits]] = {
    "synthetic": _synthetic,
    "coop": _needs_root(load_coop),
    "aircraft": _needs_root(_cacheless(load_aircraft)),
    "imagenet": _needs_root(_cacheless(load_imagenet)),
    "cifar": _needs_root(_cacheless(load_cifar)),
    "domains": _needs_root(load_domains),
    "imagefolder": _needs_root(load_imagefolder),
}


def load_source(
    card: DatasetCard, *, root: Path | None, options: Mapping[str, Any], cache_dir: Path
) -> Splits:
    """Load the dataset a card describes, with ``options`` over the card's defaults.

    ``cache_dir`` holds what fpl-bench derives (generated images, built splits); the data root
    is only read.
    """
    merged = {**card.defaults, **options}
    if root is not None and not Path(root).is_dir():
        raise UsageError(f"--data-root {root}: no such folder; {card.obtain}")
    return LOADERS[card.kind](card, root, merged, Path(cache_dir))
