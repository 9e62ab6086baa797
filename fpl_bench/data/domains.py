"""Multi-domain datasets: one folder per domain, one sub-folder per class, a domain id per image.

Layout: ``<root>/<dataset_dir>/<domain>/<class folder>/<image>``, the form in which
Office-Caltech10 (amazon, caltech, dslr, webcam), DomainNet (clipart, infograph, painting,
quickdraw, real, sketch) and PACS (art_painting, cartoon, photo, sketch) unpack. The card lists
the domains and the class folders in label order: DomainNet is used through the 10-class subset
of FedBN (Li et al., ICLR 2021), which FedPGP and DP-FPL reuse (linhhtran/DP-FPL,
``data_utils.py``, ``DomainNetDataset``: bird, feather, headphones, ice_cream, teapot, tiger,
whale, windmill, wine_glass, zebra); other class folders are ignored.

Split: each (domain, class) folder is split train/val/test with CoOp's fractions rule (see
``folders.split_groups``), seeded, stored in the cache dir. Departure: FedBN and DP-FPL read
fixed per-domain lists from ``<domain>_train.pkl``/``_test.pkl`` via ``np.load(...,
allow_pickle=True)``; those pickles are not read here (a pickle can run code), so the split is
our own seeded one and its numbers are not comparable image-for-image.

Every image carries its domain id (index into ``Splits.domain_names``), for the ``ByDomain``
partitioner and the cross-/multi-domain protocols. ``concat_domains`` builds the same from
in-memory per-domain splits (the synthetic source's four backgrounds).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from fpl_bench.data.catalog import DatasetCard, DomainSource
from fpl_bench.data.folders import (
    Entry,
    Group,
    cached_split,
    check_files,
    file_splits,
    list_images,
    split_fractions,
    split_groups,
)
from fpl_bench.data.imageset import SPLITS, ImageSet, Splits
from fpl_bench.data.options import check_options
from fpl_bench.data.problems import Problem, raise_problems
from fpl_bench.errors import UsageError

__all__ = ["OPTIONS", "DomainScan", "concat_domains", "load_domains", "scan_domains"]

OPTIONS: dict[str, Any] = {"seed": 0, "p_train": 0.5, "p_val": 0.2, "domain": "all"}


@dataclass
class DomainScan:
    """What reading a domain dataset found: split lists (with domain ids) and problems."""

    base: Path  # the resolved dataset folder
    domains: tuple[str, ...] = ()
    entries: dict[str, list[Entry]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def selected_domains(card: DatasetCard, choice: Any) -> tuple[str, ...]:
    """The domains a run uses (``--dataset-option domain=...``): all of the card's
    ("all" or None), or a subset (a list, or names joined by commas: "clipart,real")."""
    src = card.source
    assert isinstance(src, DomainSource)
    if choice is None or choice == "all":
        return src.domains
    names = choice.split(",") if isinstance(choice, str) else choice
    if not isinstance(names, list | tuple) or not names:
        raise UsageError(
            f"dataset {card.name}: domain={choice!r}; use e.g. --dataset-option domain=real,sketch"
        )
    unknown = [n for n in names if n not in src.domains]
    if unknown:
        raise UsageError(
            f"dataset {card.name}: unknown domain {unknown[0]!r}; known: {', '.join(src.domains)}"
        )
    return tuple(names)


def scan_domains(
    card: DatasetCard, root: Path, options: Mapping[str, Any], cache_dir: Path | None
) -> DomainScan:
    """List and split the domain folders of a dataset under ``root``; problems are collected."""
    src = card.source
    assert isinstance(src, DomainSource)
    opts = check_options(card.name, options, OPTIONS)
    p_train, p_val = split_fractions(opts)
    dataset_dir = Path(root) / src.dataset_dir
    scan = DomainScan(base=dataset_dir.resolve(), domains=selected_domains(card, opts["domain"]))
    if not dataset_dir.is_dir():
        detail = f"no folder {src.dataset_dir}/ under {root}"
        scan.problems.append(Problem("missing", src.dataset_dir, detail))
        return scan
    groups: list[Group] = []
    for d, domain in enumerate(scan.domains):
        for label, folder in enumerate(src.classnames):
            where = str(PurePosixPath(src.dataset_dir, domain, folder))
            if not (dataset_dir / domain / folder).is_dir():
                scan.problems.append(Problem("missing", where, f"no class folder {where}/"))
                continue
            names = list_images(dataset_dir / domain / folder)
            groups.append(Group(label, folder, d, [f"{domain}/{folder}/{n}" for n in names], where))
    if scan.problems:
        scan.entries = {s: [] for s in SPLITS}
        return scan
    key = {
        "dataset": card.name,
        "seed": opts["seed"],
        "p_train": p_train,
        "p_val": p_val,
        "groups": [[g.domain, g.label, g.paths] for g in groups],
    }
    scan.entries, scan.problems = cached_split(
        cache_dir,
        name=card.name,
        key=key,
        build=lambda: split_groups(groups, seed=opts["seed"], p_train=p_train, p_val=p_val),
    )
    return scan


def load_domains(
    card: DatasetCard, root: Path, options: Mapping[str, Any], cache_dir: Path | None
) -> Splits:
    """File-backed Splits of a domain dataset, each image with its domain id."""
    src = card.source
    assert isinstance(src, DomainSource)
    scan = scan_domains(card, root, options, cache_dir)
    problems = list(scan.problems)
    if not problems:
        where = lambda rel: str(PurePosixPath(src.dataset_dir, rel))  # noqa: E731
        problems = check_files(scan.entries, scan.base, where=where)
    raise_problems(card.name, Path(root), problems)
    return file_splits(
        scan.entries,
        base=scan.base,
        kind="domains",
        classnames=src.classnames,
        domain_names=scan.domains,
        extra={"dataset": card.name},
    )


def concat_domains(parts: Sequence[Splits]) -> Splits:
    """One in-memory Splits from one-domain Splits with the same classes; domain i = parts[i].

    The fingerprint hashes the parts' fingerprints and domain names, in order.
    """
    if not parts:
        raise ValueError("concat_domains needs at least one part")
    classnames = parts[0].classnames
    if any(p.classnames != classnames for p in parts):
        raise ValueError("concat_domains: the parts disagree on the class names")
    if any(p.train.images is None for p in parts):
        raise ValueError("concat_domains joins in-memory splits only")
    names = tuple(name for p in parts for name in p.domain_names)
    if len(names) != len(parts) or len(set(names)) != len(names):
        raise ValueError(f"concat_domains needs distinct one-domain parts, got {names}")
    sets = {}
    for split in SPLITS:
        pieces: list[ImageSet] = [getattr(p, split) for p in parts]
        sets[split] = ImageSet(
            labels=np.concatenate([s.labels for s in pieces]),
            images=np.concatenate([s.images for s in pieces]),  # type: ignore[misc]
            domains=np.concatenate([np.full(len(s), d, np.int64) for d, s in enumerate(pieces)]),
        )
    blob = json.dumps({"domains": list(names), "parts": [p.fingerprint for p in parts]})
    return Splits(
        classnames=classnames,
        train=sets["train"],
        val=sets["val"],
        test=sets["test"],
        fingerprint=hashlib.sha256(blob.encode()).hexdigest(),
        domain_names=names,
    )
