"""ImageNet (ILSVRC-2012) as CoOp reads it: class folders under ``images/train`` and ``images/val``.

Reference: KaiyangZhou/CoOp, ``DATASETS.md`` (``imagenet/images/{train,val}/`` with 1,000
folders such as ``n01440764``; ``train/`` and ``val/`` may be symlinks to a copy kept
elsewhere (a class folder linking out of its split folder is refused as an escape), and
``imagenet/classnames.txt`` from CoOp's link; the names are CLIP's) and ``datasets/imagenet.py``
(``ImageNet``): ``read_classnames`` maps each line ``<wnid> <class name>`` to wnid -> name;
``read_data`` labels the *sorted* class folders of a split folder 0, 1, ... and takes every
file in each; the train folder is train, and the val folder is the test set ("follow standard
practice to perform evaluation on the val set"), which CoOp also uses as its val set.

Departures from CoOp:

- **val**: CoOp's val is the test set. fpl-bench tunes on val and promises tuning never sees
  test, so here val is a seeded per-class holdout of the train folder (options ``seed`` and
  ``val_fraction``, as CIFAR's; ``folders.holdout``), taken out of train. Test is CoOp's.
- **Labels** follow the sorted class folders of ``images/train`` (CoOp's order), and the test
  images take the label of their folder's name; CoOp numbers each split's folders on its own,
  so a class folder missing from one split would shift the others' labels. Here the class
  folders of train and val must be the same, each with a line in ``classnames.txt``, and
  their count must be the card's: anything else is a ``classname_mismatch`` problem.
- CoOp caches the lists in ``imagenet/preprocessed.pkl`` (and writes it into the dataset
  folder): that pickle is never read here, nor anything written to the data root. Only files
  with an image suffix are listed (CoOp lists every non-hidden file).
- The official validation archive unpacks flat (50,000 files, no class folders); a val folder
  without class folders is a ``missing`` problem saying to sort it into ``<wnid>/`` folders.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from fpl_bench.data.catalog import DatasetCard, ImageNetSource
from fpl_bench.data.folders import (
    Entry,
    ListScan,
    holdout,
    list_class_folders,
    list_images,
    load_scan,
    read_pairs,
    val_fraction,
)
from fpl_bench.data.imageset import SPLITS, Splits
from fpl_bench.data.options import check_options
from fpl_bench.data.problems import Problem

__all__ = ["OPTIONS", "load_imagenet", "scan_imagenet"]

OPTIONS: dict[str, Any] = {"seed": 0, "val_fraction": 0.04}


def scan_imagenet(card: DatasetCard, root: Path, options: Mapping[str, Any]) -> ListScan:
    """List the class folders of train and val under ``root`` and carve the val holdout.

    Missing folders and files are ``missing`` problems (then the scan stops); class folders
    that differ between train and val, lack a class name or miscount the card are listed.
    """
    src = card.source
    assert isinstance(src, ImageNetSource)
    opts = check_options(card.name, options, OPTIONS)
    fraction = val_fraction(card.name, opts["val_fraction"])
    dataset_dir = Path(root) / src.dataset_dir
    image_dir = dataset_dir / src.image_dir
    named = lambda *parts: str(PurePosixPath(src.dataset_dir, *parts))  # noqa: E731
    scan = ListScan(
        folder=image_dir,
        prefix=named(src.image_dir),
        entries={split: [] for split in SPLITS},
        subdirs={"train": src.train_dir, "val": src.train_dir, "test": src.test_dir},
    )
    train_where, test_where = scan.where("train", ""), scan.where("test", "")
    scan.origin = (
        f"test: {test_where}/; val: seeded holdout of {train_where}/ "
        f"(val_fraction {fraction}, seed {opts['seed']})"
    )
    if not dataset_dir.is_dir():
        detail = f"no folder {src.dataset_dir}/ under {root}"
        scan.problems.append(Problem("missing", src.dataset_dir, detail))
        return scan
    if not (dataset_dir / src.classes_file).is_file():
        where = named(src.classes_file)
        detail = f"no file {where} (CoOp's class names; see the card's `obtain`)"
        scan.problems.append(Problem("missing", where, detail))
    folders: dict[str, list[str]] = {}
    for split, where in (("train", train_where), ("test", test_where)):
        path = image_dir / scan.subdirs[split]
        folders[split] = list_class_folders(path) if path.is_dir() else []
        if not path.is_dir():
            scan.problems.append(Problem("missing", where, f"no folder {where}/"))
        elif not folders[split]:
            flat = " (it holds images: sort the official val archive into <wnid>/ folders)"
            loose = flat if list_images(path) else ""
            detail = f"no class folders in {where}/{loose}"
            scan.problems.append(Problem("missing", where, detail))
    if scan.problems:
        return scan
    names = _classnames(dataset_dir / src.classes_file, named(src.classes_file), scan)
    _same_classes(card.classes, folders["train"], folders["test"], names, scan)
    labels = {wnid: label for label, wnid in enumerate(folders["train"])}
    scan.classnames = tuple(names.get(wnid, wnid) for wnid in folders["train"])
    for split, wnids in folders.items():
        folder = image_dir / scan.subdirs[split]
        for wnid in (w for w in wnids if w in labels):
            label, name = labels[wnid], names.get(wnid, wnid)
            scan.entries[split] += [
                Entry(f"{wnid}/{file}", label, name) for file in list_images(folder / wnid)
            ]
    train = scan.entries["train"]
    held = set(holdout([e.label for e in train], fraction=fraction, seed=opts["seed"]).tolist())
    scan.entries["val"] = [e for i, e in enumerate(train) if i in held]
    scan.entries["train"] = [e for i, e in enumerate(train) if i not in held]
    return scan


def _classnames(path: Path, where: str, scan: ListScan) -> dict[str, str]:
    """wnid -> class name from the class-name file; a wnid named twice is a problem."""
    pairs, problems = read_pairs(path, where=where, form="<wnid> <class name>")
    scan.problems += problems
    names: dict[str, str] = {}
    for n, wnid, name in pairs:
        if names.setdefault(wnid, name) != name:
            detail = f"line {n}: {wnid} is {name!r} here but {names[wnid]!r} earlier"
            scan.problems.append(Problem("classname_mismatch", where, detail))
    return names


def _same_classes(
    n_classes: int, train: list[str], test: list[str], names: Mapping[str, str], scan: ListScan
) -> None:
    """Problems: train and val class folders that differ, lack a name or miscount the card."""
    train_dir, test_dir = scan.where("train", ""), scan.where("test", "")
    wrong = lambda where, detail: Problem("classname_mismatch", where, detail)  # noqa: E731
    if len(train) != n_classes:
        detail = f"{len(train)} class folders, but the card says {n_classes} classes"
        scan.problems.append(wrong(train_dir, detail))
    for wnid in train:
        if wnid not in names:
            detail = "no line for this class folder in the class-name file"
            scan.problems.append(wrong(f"{train_dir}/{wnid}", detail))
    for wnid in sorted(set(test) - set(train)):
        detail = f"no class folder {wnid}/ in {train_dir}/ (labels come from train)"
        scan.problems.append(wrong(f"{test_dir}/{wnid}", detail))
    for wnid in sorted(set(train) - set(test)):
        detail = f"no class folder {wnid}/ in {test_dir}/ (no test images)"
        scan.problems.append(wrong(f"{train_dir}/{wnid}", detail))


def load_imagenet(card: DatasetCard, root: Path, options: Mapping[str, Any]) -> Splits:
    """File-backed Splits of ImageNet (train minus a val holdout, val, the val folder as test)."""
    return load_scan(card.name, root, scan_imagenet(card, root, options), kind="imagenet")
