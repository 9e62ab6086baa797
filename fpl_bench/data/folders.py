"""Image folders on disk: safe split paths, class-folder listing, seeded splits, split lists.

Shared by the CoOp-layout, FGVC-Aircraft, ImageNet and domain sources and by ``data check``.

- **Split entries** are ``[rel_path, label, classname]`` (CoOp's ``split_zhou_*.json``; KaiyangZhou/CoOp,
  ``datasets/oxford_pets.py``, ``OxfordPets.save_split``/``read_split``) or, for domain
  datasets, ``[rel_path, label, classname, domain]``. A path is used only if it is relative, has
  no ``..`` and, with symlinks followed, stays inside the image folder; anything else is a
  ``path_escape`` problem, never opened. (The dataset folder itself may be a symlink, as CoOp's
  DATASETS.md suggests for copies kept elsewhere: containment is checked against its target.)
- **Seeded class-folder split** (``split_groups``): per class, shuffle the sorted file names and
  cut ``round(n p_train)`` train, ``round(n p_val)`` val, the rest test, as CoOp's
  ``DescribableTextures.read_and_split_data`` (p_trn 0.5, p_val 0.2). Departure: CoOp shuffles
  with Python's global ``random``; here ``np.random.default_rng(seed)`` owns the draw, so the
  split depends on the seed and the listing only. Such a split is written to fpl-bench's cache
  dir (``<cache>/data/splits/``), never into the user's data folder.
- **Text lists** (``read_lines``, ``read_pairs``): CoOp reads FGVC-Aircraft's ``variants.txt``
  and ``images_variant_*.txt`` and ImageNet's ``classnames.txt`` line by line, a pair line as
  ``line.strip().split(" ")``: the first token, then the rest joined by spaces (KaiyangZhou/CoOp,
  ``datasets/fgvc_aircraft.py``, ``FGVCAircraft.read_data``; ``datasets/imagenet.py``,
  ``ImageNet.read_classnames``). Here blank lines are skipped and a line without a second part,
  or a file that is not UTF-8 text, is a problem naming the file and line.
- **Scans** (``ListScan``): what a source read from disk (split lists, class names, problems,
  where the split came from), with the folder each split's paths start at, so that ``data
  check`` and loading open the same files (``scan_problems``, ``load_scan``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from fpl_bench.data.imageset import DECODE_ERRORS, SPLITS, ImageSet, Splits, file_fingerprint
from fpl_bench.data.problems import Problem, raise_problems
from fpl_bench.errors import UsageError
from fpl_bench.io import write_atomic

__all__ = [
    "IMAGE_SUFFIXES",
    "Entry",
    "Group",
    "ListScan",
    "cached_split",
    "check_files",
    "class_names",
    "file_splits",
    "holdout",
    "list_class_folders",
    "list_images",
    "load_scan",
    "parse_entries",
    "path_problem",
    "read_lines",
    "read_pairs",
    "read_split_json",
    "scan_problems",
    "split_class_folders",
    "split_fractions",
    "split_groups",
    "val_fraction",
]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


class Entry(NamedTuple):
    """One image of a split list."""

    path: str  # POSIX, relative to the image folder
    label: int
    classname: str
    domain: int = 0


class Group(NamedTuple):
    """The files of one (domain, class) folder, to be split into train/val/test."""

    label: int
    classname: str
    domain: int
    paths: list[str]  # relative to the image folder, sorted
    where: str  # the folder, for messages


# ------------------------------------------------------------------------------ paths


def path_problem(rel: object) -> str | None:
    """Why ``rel`` may not be used as a split path, or None when it may."""
    if not isinstance(rel, str) or not rel:
        return f"path {rel!r} is not a non-empty string"
    p = PurePosixPath(rel)
    if p.is_absolute():
        return "absolute path refused (split paths are relative to the image folder)"
    if ".." in p.parts:
        return "'..' in path refused (it would leave the image folder)"
    return None


def _escape_problem(base: Path, rel: str) -> str | None:
    """Why ``base / rel`` may not be opened: a bad path, or symlinks leading out of ``base``.

    ``base`` must be resolved (absolute, symlink-free).
    """
    why = path_problem(rel)
    if why is not None:
        return why
    real = (base / rel).resolve()
    if not real.is_relative_to(base):
        return f"resolves to {real}, outside {base} (a symlink pointing out is refused)"
    return None


def check_files(
    entries: Mapping[str, Sequence[Entry]],
    base: Path,
    *,
    where: Callable[[str], str],
    open_images: bool = False,
    decode: bool = False,
) -> list[Problem]:
    """Problems with the files of split lists: escapes, missing files, unreadable images.

    Args:
        entries: per split, its entries (paths relative to ``base``).
        base: the resolved image folder.
        where: formats a relative path for messages (e.g. relative to the data root).
        open_images: also open each image and check its header (``Image.verify``).
        decode: fully decode each image (slow; catches truncated files).
    """
    problems: list[Problem] = []
    for split, items in entries.items():
        for entry in items:
            why = _escape_problem(base, entry.path)
            if why is not None:
                problems.append(Problem("path_escape", where(entry.path), why, split))
                continue
            full = base / entry.path
            if not full.is_file():
                problems.append(Problem("missing_image", where(entry.path), "no such file", split))
            elif open_images or decode:
                why = _image_problem(full, decode=decode)
                if why is not None:
                    problems.append(Problem("unreadable", where(entry.path), why, split))
    return problems


def _image_problem(path: Path, *, decode: bool) -> str | None:
    """None if PIL can read ``path`` (header + verify, or a full decode), else why not."""
    try:
        with Image.open(path) as im:
            if decode:
                im.convert("RGB")
            else:
                im.verify()
    except DECODE_ERRORS as err:
        return f"cannot read image: {type(err).__name__}: {err}"
    return None


# ------------------------------------------------------------------------------ listing


def list_images(folder: Path) -> list[str]:
    """Sorted names of the image files in ``folder`` (hidden files and other suffixes skipped)."""
    return sorted(
        e.name
        for e in os.scandir(folder)
        if not e.name.startswith(".")
        and Path(e.name).suffix.lower() in IMAGE_SUFFIXES
        and e.is_file()
    )


def list_class_folders(folder: Path, ignored: Iterable[str] = ()) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``folder``, minus ``ignored``."""
    skip = set(ignored)
    return sorted(
        e.name
        for e in os.scandir(folder)
        if e.is_dir() and not e.name.startswith(".") and e.name not in skip
    )


# ------------------------------------------------------------------------------ split lists


def read_split_json(path: Path) -> Any:
    """The parsed JSON of a split file; unreadable JSON is a UsageError naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(
            f"split file {path}: cannot read JSON ({err}); re-download it or delete it "
            "(class-folder datasets then rebuild the split)"
        ) from None


def parse_entries(
    raw: Any,
    *,
    n_classes: int,
    n_domains: int = 1,
    source: str,
    where: Callable[[str], str] = str,
) -> tuple[dict[str, list[Entry]], list[Problem]]:
    """Split lists from a split file's JSON: ``{"train"|"val"|"test": [[path, label, name], ...]}``.

    Malformed entries and labels outside ``[0, n_classes)`` become problems and are dropped;
    paths are checked later (``check_files``). A missing split key or a non-object top level is
    a problem for the whole file. ``where`` formats an entry's path for messages.
    """
    problems: list[Problem] = []
    out: dict[str, list[Entry]] = {split: [] for split in SPLITS}
    if not isinstance(raw, dict):
        return out, [Problem("bad_entry", source, f"top level is {type(raw).__name__}, not {{}}")]
    for split in SPLITS:
        items = raw.get(split)
        if not isinstance(items, list):
            problems.append(Problem("bad_entry", source, f"no list under key {split!r}", split))
            continue
        for i, item in enumerate(items):
            entry, why = _entry(item, n_domains=n_domains)
            if entry is None:
                problems.append(Problem("bad_entry", source, f"entry {i}: {why}", split))
            elif not 0 <= entry.label < n_classes:
                problems.append(
                    Problem(
                        "bad_label",
                        where(entry.path),
                        f"label {entry.label} outside [0, {n_classes}) (entry {i} of {source})",
                        split,
                    )
                )
            else:
                out[split].append(entry)
    return out, problems


def _entry(item: Any, *, n_domains: int) -> tuple[Entry | None, str]:
    if not isinstance(item, list | tuple) or len(item) not in (3, 4):
        return None, f"{item!r:.80} is not [path, label, classname]"
    path, label, name = item[:3]
    domain = item[3] if len(item) == 4 else 0
    if not isinstance(path, str) or not isinstance(name, str):
        return None, f"{item!r:.80}: path and classname must be strings"
    for what, value in (("label", label), ("domain", domain)):
        if isinstance(value, bool) or not isinstance(value, int):
            return None, f"{item!r:.80}: {what} must be an integer"
    if not 0 <= domain < n_domains:
        return None, f"{item!r:.80}: domain {domain} outside [0, {n_domains})"
    return Entry(path, label, name, domain), ""


def class_names(
    entries: Mapping[str, Sequence[Entry]],
    *,
    n_classes: int,
    source: str,
    where: Callable[[str], str] = str,
) -> tuple[tuple[str, ...], list[Problem]]:
    """The class name of each label, and problems: a label with two names, or with none."""
    names: dict[int, str] = {}
    problems: list[Problem] = []
    for split, items in entries.items():
        for entry in items:
            known = names.setdefault(entry.label, entry.classname)
            if known != entry.classname:
                problems.append(
                    Problem(
                        "classname_mismatch",
                        where(entry.path),
                        f"label {entry.label} is {entry.classname!r} here but {known!r} elsewhere",
                        split,
                    )
                )
    absent = [label for label in range(n_classes) if label not in names]
    if absent:
        problems.append(
            Problem(
                "classname_mismatch",
                source,
                f"{len(absent)} of the card's {n_classes} classes have no image "
                f"(labels {absent[:5]}{'...' if len(absent) > 5 else ''})",
            )
        )
    return tuple(names.get(label, f"class {label}") for label in range(n_classes)), problems


def split_fractions(options: Mapping[str, Any]) -> tuple[float, float]:
    """(p_train, p_val) from source options, checked: 0 < p_train, 0 <= p_val, sum < 1."""
    p_train, p_val = options.get("p_train", 0.5), options.get("p_val", 0.2)
    for name, value in (("p_train", p_train), ("p_val", p_val)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UsageError(f"{name}={value!r}: must be a number (e.g. p_train=0.5, p_val=0.2)")
    if not (p_train > 0 and p_val >= 0 and p_train + p_val < 1):
        raise UsageError(
            f"p_train={p_train}, p_val={p_val}: need p_train > 0, p_val >= 0 and "
            "p_train + p_val < 1 (the rest is test)"
        )
    return float(p_train), float(p_val)


def split_groups(
    groups: Sequence[Group], *, seed: int, p_train: float, p_val: float
) -> tuple[dict[str, list[Entry]], list[Problem]]:
    """Seeded train/val/test of each group (see the module docstring): CoOp's fractions rule."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[Entry]] = {split: [] for split in SPLITS}
    problems: list[Problem] = []
    for g in groups:
        n = len(g.paths)
        n_train, n_val = round(n * p_train), round(n * p_val)
        n_test = n - n_train - n_val
        if n_train < 1 or n_test < 1 or (p_val > 0 and n_val < 1):
            problems.append(
                Problem(
                    "too_few_images",
                    g.where,
                    f"{n} images give train/val/test = {n_train}/{n_val}/{n_test} at "
                    f"p_train={p_train}, p_val={p_val}; each needs >= 1",
                )
            )
            continue
        order = rng.permutation(n)
        cuts = {"train": order[:n_train], "val": order[n_train : n_train + n_val]}
        cuts["test"] = order[n_train + n_val :]
        for split, idx in cuts.items():
            out[split].extend(Entry(g.paths[i], g.label, g.classname, g.domain) for i in idx)
    return out, problems


def split_class_folders(
    image_dir: Path,
    folders: Sequence[str],
    classnames: Sequence[str],
    *,
    name: str,
    options: Mapping[str, Any],
    cache_dir: Path | None,
    where: Callable[[str], str],
) -> tuple[dict[str, list[Entry]], list[Problem]]:
    """The seeded class-folder split of ``image_dir``: ``folders[i]`` is class i, named
    ``classnames[i]``; its images are split by ``split_groups`` (options ``seed``, ``p_train``,
    ``p_val``) and the split kept by ``cached_split`` under ``name``. ``where`` formats a class
    folder for messages. (CoOp's ``DTD.read_and_split_data``; the CoOp-layout fallback and the
    imagefolder source.)"""
    p_train, p_val = split_fractions(options)
    groups = [
        Group(
            label=label,
            classname=classname,
            domain=0,
            paths=[f"{folder}/{image}" for image in list_images(Path(image_dir) / folder)],
            where=where(folder),
        )
        for label, (folder, classname) in enumerate(zip(folders, classnames, strict=True))
    ]
    key = {
        "dataset": name,
        "seed": options["seed"],
        "p_train": p_train,
        "p_val": p_val,
        "groups": [[g.label, g.classname, g.paths] for g in groups],
    }
    return cached_split(
        cache_dir,
        name=name,
        key=key,
        build=lambda: split_groups(groups, seed=options["seed"], p_train=p_train, p_val=p_val),
    )


def val_fraction(dataset: str, value: Any) -> float:
    """A ``val_fraction`` option, checked: a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise UsageError(f"dataset {dataset}: val_fraction={value!r} must lie in [0, 1)")
    return float(value)


def holdout(labels: Sequence[int] | np.ndarray, *, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded per-class holdout: round(n_c * fraction) samples of class c.

    The val split of sources that have none (CIFAR, ImageNet): it keeps tuning off test.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        picked.append(rng.permutation(members)[: round(members.size * fraction)])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def cached_split(
    cache_dir: Path | None,
    *,
    name: str,
    key: Mapping[str, Any],
    build: Callable[[], tuple[dict[str, list[Entry]], list[Problem]]],
) -> tuple[dict[str, list[Entry]], list[Problem]]:
    """``build()``'s split, stored as JSON under ``<cache_dir>/data/splits/`` and reused.

    The file name carries a hash of ``key`` (listing, seed, fractions), so a changed folder or
    option gives a new split file and the old one is never read for it; a stored split is read
    back as it was written, whatever a later numpy's shuffle would give. A split with problems
    is not stored. Without a cache dir the split is built every time (same inputs, same split).
    """
    if cache_dir is None:
        return build()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / "data" / "splits" / f"{name}-{digest}.json"
    if path.is_file():
        raw = read_split_json(path)
        return {split: [Entry(*item) for item in raw[split]] for split in SPLITS}, []
    split, problems = build()
    if not problems:
        text = json.dumps({s: [list(e) for e in split[s]] for s in SPLITS})
        write_atomic(path, lambda tmp: Path(tmp).write_text(text))
    return split, problems


# ------------------------------------------------------------------------------ text lists


def read_lines(path: Path, *, where: str) -> tuple[list[tuple[int, str]], list[Problem]]:
    """The non-blank lines of a text file, stripped, with their 1-based numbers.

    A file that cannot be read as UTF-8 text is one ``unreadable`` problem at ``where``.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        return [], [Problem("unreadable", where, f"cannot read text: {err}")]
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1)]
    return [(n, line) for n, line in lines if line], []


def read_pairs(
    path: Path, *, where: str, form: str
) -> tuple[list[tuple[int, str, str]], list[Problem]]:
    """``(line number, first token, the rest)`` of each non-blank line, split at the first space.

    As CoOp's ``line.strip().split(" ")``, then ``" ".join(line[1:])``; the rest may hold spaces
    (a class name). A line without a second part is a ``bad_entry`` problem; ``form`` says what
    a line should look like (e.g. ``"<image id> <variant>"``).
    """
    lines, problems = read_lines(path, where=where)
    pairs = []
    for n, line in lines:
        key, _, rest = line.partition(" ")
        if rest:
            pairs.append((n, key, rest))
        else:
            problems.append(Problem("bad_entry", where, f"line {n}: {line!r:.80} is not {form!r}"))
    return pairs, problems


# ------------------------------------------------------------------------------ to Splits


def file_splits(
    entries: Mapping[str, Sequence[Entry]],
    *,
    base: Path | Mapping[str, Path],
    kind: str,
    classnames: Sequence[str],
    domain_names: Sequence[str],
    extra: Mapping[str, Any] | None = None,
) -> Splits:
    """File-backed Splits from checked split lists; the fingerprint stats every file.

    ``base``: the folder the paths are relative to, one for all splits or one per split.
    """
    sets = {
        split: ImageSet(
            labels=np.array([e.label for e in entries[split]], dtype=np.int64),
            paths=tuple(e.path for e in entries[split]),
            root=base[split] if isinstance(base, Mapping) else base,
            domains=np.array([e.domain for e in entries[split]], dtype=np.int64),
        )
        for split in SPLITS
    }
    digest = file_fingerprint(
        kind=kind, sets=sets, classnames=classnames, domain_names=domain_names, extra=extra
    )
    return Splits(
        classnames=tuple(classnames),
        train=sets["train"],
        val=sets["val"],
        test=sets["test"],
        fingerprint=digest,
        domain_names=tuple(domain_names),
    )


@dataclass
class ListScan:
    """What reading a file-backed dataset found: split lists, class names, problems.

    Attributes:
        folder: the image folder under the data root, as given (a split's ``base`` resolves
            it, so a symlinked folder is checked against its target).
        prefix: the same folder relative to the data root, POSIX, for messages.
        entries: per split, its entries, paths relative to ``base(split)``.
        classnames: the class name of each label.
        problems: what reading the lists found wrong (no image is opened yet).
        origin: where the split came from (the list files, or how it was built).
        subdirs: per split, the sub-folder of ``folder`` its paths start at (ImageNet: train/
            for train and val, val/ for test); a split not named starts at ``folder``.
    """

    folder: Path
    prefix: str
    entries: dict[str, list[Entry]] = field(default_factory=dict)
    classnames: tuple[str, ...] = ()
    problems: list[Problem] = field(default_factory=list)
    origin: str = ""
    subdirs: dict[str, str] = field(default_factory=dict)

    def base(self, split: str) -> Path:
        """The resolved folder that ``split``'s paths are relative to and must stay inside."""
        return (self.folder / self.subdirs.get(split, "")).resolve()

    def where(self, split: str, rel: str) -> str:
        """A path of ``split``, relative to the data root, for messages."""
        return str(PurePosixPath(self.prefix, self.subdirs.get(split, ""), rel))


def scan_problems(
    scan: ListScan, *, open_images: bool = False, decode: bool = False
) -> list[Problem]:
    """``check_files`` over each split of ``scan``, against that split's own base folder."""
    problems: list[Problem] = []
    for split, items in scan.entries.items():
        problems += check_files(
            {split: items},
            scan.base(split),
            where=partial(scan.where, split),
            open_images=open_images,
            decode=decode,
        )
    return problems


def load_scan(name: str, root: Path, scan: ListScan, *, kind: str) -> Splits:
    """File-backed Splits of a scanned dataset; any problem is one UsageError line.

    The lists' problems come first; only clean lists have their files checked (escapes,
    missing files), as ``load_source`` promises.
    """
    problems = list(scan.problems) or scan_problems(scan)
    raise_problems(name, Path(root), problems)
    return file_splits(
        scan.entries,
        base={split: scan.base(split) for split in SPLITS},
        kind=kind,
        classnames=scan.classnames,
        domain_names=(name,),
        extra={"dataset": name, "origin": scan.origin},
    )
