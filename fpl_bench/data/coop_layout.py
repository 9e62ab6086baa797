"""CoOp's folder layout: ``<root>/<dataset_dir>/<image_dir>/`` plus ``split_zhou_<Name>.json``.

Reference: KaiyangZhou/CoOp, ``DATASETS.md`` (folder names, where each split file comes from)
and ``datasets/*.py``. Every dataset there reads its fixed split with ``OxfordPets.read_split``:
``{"train"|"val"|"test": [[rel_path, label, classname], ...]}``, paths relative to the image
folder (Stanford Cars: to the dataset folder), labels 0-based. Without the JSON, Caltech101, DTD,
Food101 and EuroSAT build it from the class folders with ``DTD.read_and_split_data`` (p_trn
0.5, p_val 0.2; Caltech101 ignores ``BACKGROUND_Google`` and ``Faces_easy`` and renames four
classes, EuroSAT renames all ten), which the card declares as ``fallback = "class_folders"``
with ``ignored``/``renames``; the others (Pets, Flowers, Cars, SUN397, UCF101) build theirs
from annotation files, so fpl-bench asks for the published split file instead.

Departures from CoOp: a split built here is seeded by the ``seed`` option and stored in
fpl-bench's cache dir (CoOp writes it into the dataset folder, using Python's global RNG);
split paths that are absolute, contain ``..`` or lead out of the image folder through a
symlink are refused (CoOp joins them blindly).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from fpl_bench.data.catalog import CoOpSource, DatasetCard
from fpl_bench.data.folders import (
    Entry,
    ListScan,
    class_names,
    list_class_folders,
    load_scan,
    parse_entries,
    read_split_json,
    split_class_folders,
    split_fractions,
)
from fpl_bench.data.imageset import SPLITS, Splits
from fpl_bench.data.options import check_options
from fpl_bench.data.problems import Problem

__all__ = ["OPTIONS", "load_coop", "scan_coop"]

OPTIONS = {"seed": 0, "p_train": 0.5, "p_val": 0.2}  # used only when the split file is absent


def _display(src: CoOpSource, *parts: str) -> str:
    """A path relative to the data root, for messages."""
    return str(PurePosixPath(src.dataset_dir, src.image_dir, *parts))


def scan_coop(
    card: DatasetCard, root: Path, options: Mapping[str, Any], cache_dir: Path | None
) -> ListScan:
    """Read the split lists of a CoOp-layout dataset under ``root`` (no file is opened yet).

    A missing dataset folder, image folder or (without a fallback) split file gives one
    ``missing`` problem; malformed entries and class-name problems are listed, not raised.
    """
    src = card.source
    assert isinstance(src, CoOpSource)
    opts = check_options(card.name, {**OPTIONS, **options}, OPTIONS)
    dataset_dir = Path(root) / src.dataset_dir
    image_dir = dataset_dir / src.image_dir
    scan = ListScan(folder=image_dir, prefix=_display(src))
    display = lambda rel: _display(src, rel)  # noqa: E731
    if not dataset_dir.is_dir() or not image_dir.is_dir():
        missing = src.dataset_dir if not dataset_dir.is_dir() else _display(src)
        scan.problems.append(Problem("missing", missing, f"no folder {missing}/ under {root}"))
        return scan
    split_path = dataset_dir / src.split_file
    if split_path.is_file():
        scan.origin = str(PurePosixPath(src.dataset_dir, src.split_file))
        raw = read_split_json(split_path)
        scan.entries, scan.problems = parse_entries(
            raw, n_classes=card.classes, source=scan.origin, where=display
        )
    elif src.fallback == "class_folders":
        scan.entries, scan.problems = _folder_split(card, src, image_dir, opts, cache_dir)
        scan.origin = (
            f"no {src.split_file}: seeded class-folder split (seed {opts['seed']}, "
            f"p_train {opts['p_train']}, p_val {opts['p_val']}) kept in the cache dir"
        )
    else:
        where = str(PurePosixPath(src.dataset_dir, src.split_file))
        scan.problems.append(
            Problem(
                "missing",
                where,
                f"no split file {where}; {card.name} has no class-folder "
                "fallback, so get the file (see the card's `obtain`)",
            )
        )
        return scan
    scan.classnames, naming = class_names(
        scan.entries, n_classes=card.classes, source=scan.origin, where=display
    )
    scan.problems.extend(naming)
    return scan


def _folder_split(
    card: DatasetCard,
    src: CoOpSource,
    image_dir: Path,
    opts: Mapping[str, Any],
    cache_dir: Path | None,
) -> tuple[dict[str, list[Entry]], list[Problem]]:
    """CoOp's ``read_and_split_data`` over the class folders, seeded and cached."""
    split_fractions(opts)  # bad fractions are refused before the folders are listed
    folders = list_class_folders(image_dir, src.ignored)
    if len(folders) != card.classes:
        detail = f"{len(folders)} class folders, but the card says {card.classes} classes"
        return {s: [] for s in SPLITS}, [Problem("classname_mismatch", _display(src), detail)]
    return split_class_folders(
        image_dir,
        folders,
        [src.renames.get(folder, folder) for folder in folders],
        name=card.name,
        options=opts,
        cache_dir=cache_dir,
        where=lambda folder: _display(src, folder),
    )


def load_coop(
    card: DatasetCard, root: Path, options: Mapping[str, Any], cache_dir: Path | None
) -> Splits:
    """File-backed Splits of a CoOp-layout dataset; any problem is one UsageError line."""
    return load_scan(card.name, root, scan_coop(card, root, options, cache_dir), kind="coop")
