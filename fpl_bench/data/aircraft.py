"""FGVC-Aircraft as CoOp reads it: ``variants.txt`` and ``images_variant_{train,val,test}.txt``.

Reference: KaiyangZhou/CoOp, ``DATASETS.md`` (extract ``fgvc-aircraft-2013b.tar.gz``, keep its
``data/`` folder, rename it ``fgvc_aircraft/``) and ``datasets/fgvc_aircraft.py``
(``FGVCAircraft``): the class names are the stripped lines of ``variants.txt``, a class's label
its line index; ``read_data`` turns each line of a split file into ``images/<id>.jpg``, the
variant being the rest of the line after the first space (``"<id> Boeing 737-200"``), and looks
its label up by name. The split is the official one (3,334 / 3,333 / 3,333 images of 100
variants), so it is fixed: no seed, no option.

Departures from CoOp: blank lines are skipped; a variant missing from ``variants.txt`` (CoOp: a
``KeyError``), a repeated variant, a malformed line, an image id that is absolute, holds ``..``
or leads out of ``images/`` through a symlink, and a missing image are problems listed by
``fpl-bench data check`` and turned into one UsageError line by loading.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

from fpl_bench.data.catalog import AircraftSource, DatasetCard
from fpl_bench.data.folders import (
    Entry,
    ListScan,
    class_names,
    load_scan,
    read_lines,
    read_pairs,
)
from fpl_bench.data.imageset import SPLITS, Splits
from fpl_bench.data.options import check_options
from fpl_bench.data.problems import Problem

__all__ = ["OPTIONS", "load_aircraft", "scan_aircraft"]

OPTIONS: dict[str, Any] = {}  # the official split: nothing to choose


def _lists(src: AircraftSource) -> dict[str, str]:
    return {"train": src.train_list, "val": src.val_list, "test": src.test_list}


def scan_aircraft(card: DatasetCard, root: Path, options: Mapping[str, Any]) -> ListScan:
    """Read ``variants.txt`` and the three split lists under ``root`` (no image opened yet).

    Missing folders and files are ``missing`` problems (all of them, then the scan stops);
    malformed lines, unknown or repeated variants and a class count off the card are listed.
    """
    src = card.source
    assert isinstance(src, AircraftSource)
    check_options(card.name, options, OPTIONS)
    dataset_dir = Path(root) / src.dataset_dir
    named = lambda *parts: str(PurePosixPath(src.dataset_dir, *parts))  # noqa: E731
    lists = _lists(src)
    scan = ListScan(
        folder=dataset_dir / src.image_dir,
        prefix=named(src.image_dir),
        entries={split: [] for split in SPLITS},
        origin=", ".join(named(name) for name in lists.values()),
    )
    if not dataset_dir.is_dir():
        detail = f"no folder {src.dataset_dir}/ under {root}"
        scan.problems.append(Problem("missing", src.dataset_dir, detail))
        return scan
    wanted = {src.image_dir: "folder", src.classes_file: "file"}
    wanted.update({name: "file" for name in lists.values()})
    for name, what in wanted.items():
        path = dataset_dir / name
        if not (path.is_dir() if what == "folder" else path.is_file()):
            end = "/" if what == "folder" else ""
            scan.problems.append(Problem("missing", named(name), f"no {what} {named(name)}{end}"))
    if scan.problems:
        return scan
    classes = named(src.classes_file)
    variants, problems = read_lines(dataset_dir / src.classes_file, where=classes)
    scan.problems += problems
    labels = _labels(card, [name for _, name in variants], classes, scan)
    for split, name in lists.items():
        pairs, problems = read_pairs(
            dataset_dir / name, where=named(name), form="<image id> <variant>"
        )
        scan.problems += problems
        for n, image_id, variant in pairs:
            rel = image_id + src.image_suffix
            if variant not in labels:
                detail = f"line {n} of {named(name)}: variant {variant!r} is not in {classes}"
                scan.problems.append(Problem("bad_label", scan.where(split, rel), detail, split))
            else:
                scan.entries[split].append(Entry(rel, labels[variant], variant))
    scan.classnames = tuple(name for _, name in variants)
    if len(labels) == card.classes:
        _, absent = class_names(
            scan.entries,
            n_classes=card.classes,
            source=scan.origin,
            where=partial(scan.where, "train"),
        )
        scan.problems += absent
    return scan


def _labels(card: DatasetCard, names: list[str], where: str, scan: ListScan) -> dict[str, int]:
    """Class name -> label (line index); repeats and a count off the card become problems."""
    labels: dict[str, int] = {}
    for label, name in enumerate(names):
        if name in labels:
            detail = f"{name!r} is listed twice (labels {labels[name]} and {label})"
            scan.problems.append(Problem("classname_mismatch", where, detail))
        labels.setdefault(name, label)
    if len(names) != card.classes:
        detail = f"{len(names)} class names, but the card says {card.classes} classes"
        scan.problems.append(Problem("classname_mismatch", where, detail))
    return labels


def load_aircraft(card: DatasetCard, root: Path, options: Mapping[str, Any]) -> Splits:
    """File-backed Splits of FGVC-Aircraft (the official split); any problem is one line."""
    return load_scan(card.name, root, scan_aircraft(card, root, options), kind="aircraft")
