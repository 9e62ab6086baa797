"""Any class-per-folder image tree: ``<root>/<image_dir>/<class folder>/<image>``.

torchvision's ``ImageFolder`` layout (``ROOT/dog/xxx.png``, ``ROOT/cat/123.jpg``), the form most
image collections take: the generic card ``datasets/imagefolder.toml`` reads the data root
itself as the tree (``--data-root ROOT``); a card of one's own may point ``image_dir`` at a
sub-folder. Labels follow the sorted class folders, as ``ImageFolder.find_classes`` numbers
them; hidden folders and files without an image suffix are skipped (``folders.list_images``).

Class names (what the text tower reads): each folder's name with underscores as spaces
(``golden_retriever`` -> "golden retriever"), or, with the option ``names_file`` (a file under
the data root), the names it gives: ``<folder> <class name>`` a line, as ImageNet's
``classnames.txt`` (``folders.read_pairs``); every class folder needs a line.

Split: CoOp's class-folder fallback (``DTD.read_and_split_data``: per class, p_train 0.5 and
p_val 0.2 of the shuffled files, the rest test), seeded by the option ``seed`` and written to
the cache dir (``<cache>/data/splits/``, ``folders.split_class_folders``), so a rerun reads the
split it wrote, whatever a later numpy's shuffle would give. The data root is only read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from fpl_bench.data.catalog import DatasetCard, ImageFolderSource
from fpl_bench.data.folders import (
    ListScan,
    list_class_folders,
    load_scan,
    path_problem,
    read_pairs,
    split_class_folders,
    split_fractions,
)
from fpl_bench.data.imageset import SPLITS, Splits
from fpl_bench.data.options import check_options
from fpl_bench.data.problems import Problem
from fpl_bench.errors import UsageError

__all__ = ["OPTIONS", "load_imagefolder", "scan_imagefolder"]

OPTIONS: dict[str, Any] = {"seed": 0, "p_train": 0.5, "p_val": 0.2, "names_file": ""}


def scan_imagefolder(
    card: DatasetCard, root: Path, options: Mapping[str, Any], cache_dir: Path | None
) -> ListScan:
    """List the class folders under ``root``, name them and split them (no image is opened).

    A missing tree or names file, or no class folder, is a ``missing`` problem (the scan stops);
    a class count off the card, a class folder without a name or two folders with one name
    are ``classname_mismatch`` problems; a class too small to split is ``too_few_images``.
    """
    src = card.source
    assert isinstance(src, ImageFolderSource)
    opts = check_options(card.name, {**OPTIONS, **options}, OPTIONS)
    split_fractions(opts)  # bad fractions are refused before anything is listed
    names_file = _names_file(card.name, opts["names_file"])
    image_dir = Path(root) / src.image_dir
    prefix = str(PurePosixPath(src.image_dir))
    display = lambda rel: str(PurePosixPath(prefix, rel))  # noqa: E731
    scan = ListScan(folder=image_dir, prefix=prefix, entries={s: [] for s in SPLITS})
    folders = list_class_folders(image_dir, src.ignored) if image_dir.is_dir() else []
    if not folders:
        detail = f"no class folders ({prefix}/<class>/<image>) under {root}"
        scan.problems.append(Problem("missing", prefix, detail))
        return scan
    if card.classes is not None and len(folders) != card.classes:
        detail = f"{len(folders)} class folders, but the card says {card.classes} classes"
        scan.problems.append(Problem("classname_mismatch", prefix, detail))
        return scan
    names = _class_names(folders, Path(root), names_file, scan.problems)
    if scan.problems:
        return scan
    scan.entries, scan.problems = split_class_folders(
        image_dir,
        folders,
        names,
        name=card.name,
        options=opts,
        cache_dir=cache_dir,
        where=display,
    )
    scan.classnames = tuple(names)
    scan.origin = (
        f"seeded class-folder split (seed {opts['seed']}, p_train {opts['p_train']}, "
        f"p_val {opts['p_val']}) kept in the cache dir"
    )
    return scan


def _names_file(dataset: str, value: Any) -> str:
    """The ``names_file`` option, checked: "" (folder names) or a path under the data root."""
    if not isinstance(value, str):
        raise UsageError(f"dataset {dataset}: names_file={value!r} must be a path (text)")
    why = path_problem(value) if value else None
    if why is not None:
        raise UsageError(
            f"dataset {dataset}: names_file={value!r}: {why}; give a file under --data-root"
        )
    return value


def _class_names(
    folders: Sequence[str], root: Path, names_file: str, problems: list[Problem]
) -> list[str]:
    """Each folder's class name (see the module docstring); problems are appended."""
    if not names_file:
        names = [folder.replace("_", " ") for folder in folders]
    elif not (root / names_file).is_file():
        problems.append(Problem("missing", names_file, f"no names file {names_file}"))
        return []
    else:
        pairs, found = read_pairs(root / names_file, where=names_file, form="<folder> <name>")
        problems += found
        given = {folder: name for _, folder, name in pairs}
        absent = [folder for folder in folders if folder not in given]
        if absent:
            detail = f"no line for the class folder(s) {', '.join(absent[:5])}"
            problems.append(Problem("classname_mismatch", names_file, detail))
        names = [given.get(folder, folder) for folder in folders]
    seen: dict[str, str] = {}
    for folder, name in zip(folders, names, strict=True):
        if name in seen:
            detail = f"folders {seen[name]!r} and {folder!r} both give the class name {name!r}"
            problems.append(Problem("classname_mismatch", folder, detail))
        seen.setdefault(name, folder)
    return names


def load_imagefolder(
    card: DatasetCard, root: Path, options: Mapping[str, Any], cache_dir: Path | None
) -> Splits:
    """File-backed Splits of a class-per-folder tree; any problem is one UsageError line."""
    scan = scan_imagefolder(card, root, options, cache_dir)
    return load_scan(card.name, root, scan, kind="imagefolder")
