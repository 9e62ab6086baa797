"""Dataset cards: ``datasets/<name>.toml``, validated once, keyed by file stem (configs as data).

A card says what a dataset is (class count, citation, default partition), where it comes from
(URL, steps) and how it lies on disk (``layout``, and a ``[source]`` table whose ``kind`` picks
the loader and whose other keys are that loader's fixed facts); ``[defaults]`` holds the options
a user may override (``--dataset-option``), such as a seed. Like open_clip's model configs, the
folder is scanned once; unlike open_clip, a card with a missing or unknown field is an error
(one line naming the file and the field), never a skip.

Source kinds (``source.kind``):

- ``synthetic``: the embedded generated source (``fpl_bench/data/synthetic.py``).
- ``coop``: CoOp's folder layout with ``split_zhou_<Name>.json`` (KaiyangZhou/CoOp,
  ``DATASETS.md`` and ``datasets/*.py``); without the JSON, ``fallback = "class_folders"``
  splits the class folders as CoOp's ``DescribableTextures.read_and_split_data`` does.
- ``aircraft``: FGVC-Aircraft as CoOp reads it (``datasets/fgvc_aircraft.py``): class names one
  per line of ``variants.txt``, the split in ``images_variant_{train,val,test}.txt``.
- ``imagenet``: ImageNet as CoOp reads it (``datasets/imagenet.py``): class folders under
  ``images/train`` and ``images/val``, names from ``classnames.txt``.
- ``cifar``: CIFAR-10/100 in torchvision's on-disk format (python pickles).
- ``domains``: one folder per domain with one sub-folder per class (Office-Caltech10, DomainNet,
  PACS as FedBN, FedPGP and DP-FPL use them).
- ``imagefolder``: any class-per-folder tree (torchvision's ``ImageFolder`` layout); the class
  count may be left out (the folders say it), the split is seeded and kept in the cache dir.

A card need not ship with fpl-bench: wherever a dataset name is taken (``--dataset``, a
suite's grid) a path to a card file is taken too (``card_path``). The file is validated like a
shipped card, must not reuse a shipped card's name, and joins this process's cards under its
name (``dataset_card``), as open_clip's ``add_model_config(path)`` does.

>>> card = dataset_card("synthetic")
>>> card.kind, card.classes
('synthetic', 64)
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Collection, Mapping
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fpl_bench.errors import UsageError

__all__ = [
    "AircraftSource",
    "CifarSource",
    "CoOpSource",
    "DatasetCard",
    "DomainSource",
    "ImageFolderSource",
    "ImageNetSource",
    "SyntheticSource",
    "card_path",
    "check_card_name",
    "dataset_card",
    "dataset_cards",
    "load_card",
    "parse_card",
]


def _relative(value: str) -> str:
    """A card's folder or file name: relative, POSIX, without '..' (it is joined to the root)."""
    p = PurePosixPath(value)
    if p.is_absolute() or ".." in p.parts or "\\" in value:
        raise ValueError(f"{value!r} must be a relative POSIX path without '..'")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticSource(_Strict):
    """The embedded generated source: nothing on disk."""

    kind: Literal["synthetic"]


class CoOpSource(_Strict):
    """CoOp layout: ``<root>/<dataset_dir>/<image_dir>/...`` and ``<dataset_dir>/<split_file>``.

    Paths in the split file are relative to ``image_dir`` ("." for Stanford Cars, whose split
    paths start at the dataset folder). ``fallback = "class_folders"``: with no split file, the
    class sub-folders of ``image_dir`` (minus ``ignored``, names mapped by ``renames``) are split
    per class, seeded; ``"none"``: the split file is required.
    """

    kind: Literal["coop"]
    dataset_dir: str
    image_dir: str
    split_file: str
    fallback: Literal["class_folders", "none"]
    ignored: tuple[str, ...] = ()
    renames: dict[str, str] = Field(default_factory=dict)

    _rel = field_validator("dataset_dir", "image_dir", "split_file")(_relative)


class AircraftSource(_Strict):
    """FGVC-Aircraft: ``<dataset_dir>/<image_dir>/<id><image_suffix>``, and in ``dataset_dir``
    ``classes_file`` (one class name a line; label = 0-based line number among the non-blank
    lines) and one list per split (``<image id> <class name>`` a line)."""

    kind: Literal["aircraft"]
    dataset_dir: str
    image_dir: str
    classes_file: str
    train_list: str
    val_list: str
    test_list: str
    image_suffix: str = Field(pattern=r"^\.[A-Za-z0-9]+$")

    _rel = field_validator(
        "dataset_dir", "image_dir", "classes_file", "train_list", "val_list", "test_list"
    )(_relative)


class ImageNetSource(_Strict):
    """ImageNet: ``<dataset_dir>/<image_dir>/<train_dir>/<wnid>/*`` and ``.../<test_dir>/<wnid>/*``
    with ``<dataset_dir>/<classes_file>`` (``<wnid> <class name>`` a line). Labels follow the
    sorted class folders of ``train_dir``; val is a seeded holdout of train (option
    ``val_fraction``)."""

    kind: Literal["imagenet"]
    dataset_dir: str
    image_dir: str
    classes_file: str
    train_dir: str
    test_dir: str

    _rel = field_validator("dataset_dir", "image_dir", "classes_file", "train_dir", "test_dir")(
        _relative
    )


class CifarSource(_Strict):
    """torchvision's CIFAR folder (``cifar-10-batches-py`` or ``cifar-100-python``)."""

    kind: Literal["cifar"]
    folder: str
    variant: Literal["cifar10", "cifar100"]

    _rel = field_validator("folder")(_relative)


class DomainSource(_Strict):
    """``<root>/<dataset_dir>/<domain>/<class folder>/<image>``; ``classnames`` in label order."""

    kind: Literal["domains"]
    dataset_dir: str
    domains: tuple[str, ...] = Field(min_length=1)
    classnames: tuple[str, ...] = Field(min_length=1)

    _rel = field_validator("dataset_dir")(_relative)


class ImageFolderSource(_Strict):
    """Any class-per-folder tree, torchvision's ``ImageFolder`` layout:
    ``<root>/<image_dir>/<class folder>/<image>`` ("." : the data root is the tree).

    Labels follow the sorted class folders (minus ``ignored``); a class is named by its folder
    with underscores as spaces, or by the ``names_file`` option (``<folder> <class name>`` a
    line, under the data root). Each class is split train/val/test as CoOp's class-folder
    fallback does (options ``seed``, ``p_train``, ``p_val``), and the split is kept in the cache
    dir, so a rerun reads the same one (``fpl_bench/data/imagefolder.py``).
    """

    kind: Literal["imagefolder"]
    image_dir: str = "."
    ignored: tuple[str, ...] = ()

    _rel = field_validator("image_dir")(_relative)


Source = Annotated[
    SyntheticSource
    | CoOpSource
    | AircraftSource
    | ImageNetSource
    | CifarSource
    | DomainSource
    | ImageFolderSource,
    Field(discriminator="kind"),
]


class DatasetCard(_Strict):
    """One ``datasets/<name>.toml``: what the data is, where to get it, how it lies on disk.

    Attributes:
        name: the file stem, the ``--dataset`` value.
        summary: one line for ``fpl-bench datasets``.
        classes: number of classes the source must yield; an ``imagefolder`` card may leave it
            out (None: as many as it has class folders).
        train_images: training images of the standard split with the default options, where
            known (published split sizes); only time estimates read it (a suite's dry run).
        layout: the expected folder layout under ``--data-root``, as text.
        url: where to obtain the data (text; never fetched by fpl-bench).
        obtain: the steps to get and arrange it, one paragraph.
        citation: the paper (authors, title, venue, year).
        partition: the default client partition for this dataset.
        source: the loader kind and its fixed facts (see the module docstring).
        defaults: user-overridable loader options (seeds, split fractions, ...).
    """

    name: str
    summary: str
    classes: int | None = Field(default=None, ge=1)
    train_images: int | None = Field(default=None, ge=1)
    layout: str
    url: str
    obtain: str
    citation: str
    partition: Literal["pathological", "dirichlet", "iid", "by_domain"]
    source: Source
    defaults: dict[str, Any] = Field(default_factory=dict)

    @property
    def kind(self) -> str:
        """The source kind: synthetic, coop, aircraft, imagenet, cifar, domains or imagefolder."""
        return self.source.kind

    @model_validator(mode="after")
    def _consistent(self) -> DatasetCard:
        src = self.source
        if self.classes is None and not isinstance(src, ImageFolderSource):
            raise ValueError(
                f"classes is required for a {src.kind} source (only an imagefolder source "
                "may leave it out: its class folders say it)"
            )
        if isinstance(src, DomainSource) and len(src.classnames) != self.classes:
            raise ValueError(
                f"classes={self.classes} but source.classnames lists {len(src.classnames)}"
            )
        if isinstance(src, CifarSource):
            expected = 10 if src.variant == "cifar10" else 100
            if self.classes != expected:
                raise ValueError(f"classes={self.classes} but {src.variant} has {expected}")
        if self.partition == "by_domain" and src.kind not in ("domains", "synthetic"):
            raise ValueError(f"partition='by_domain' needs a domain source, not {src.kind!r}")
        return self


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(part) for part in first["loc"]) or "(card)"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{loc}: {first['msg']}{more}"


def parse_card(data: dict[str, Any], *, where: str) -> DatasetCard:
    """Validate a card's TOML table; any problem is a one-line UsageError naming ``where``."""
    try:
        return DatasetCard.model_validate(data)
    except ValidationError as err:
        raise UsageError(f"bad card {where}: {_one_line(err)}") from None


def load_card(path: Path) -> DatasetCard:
    """Read and validate one card file; its ``name`` must equal the file stem."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read card {path}: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"bad card {path}: {err}") from None
    card = parse_card(data, where=str(path))
    if card.name != Path(path).stem:
        raise UsageError(f"bad card {path}: name {card.name!r} differs from the file stem")
    return card


def cards_dir() -> Path:
    """The ``datasets/`` folder beside ``methods/`` (the checkout or the installed share dir)."""
    from fpl_bench.cards import cards_root  # lazy: fpl_bench.cards re-exports this module

    return cards_root() / "datasets"


@cache
def dataset_cards() -> dict[str, DatasetCard]:
    """Every card of ``datasets/``, keyed by name, sorted; read once per process."""
    return {path.stem: load_card(path) for path in sorted(cards_dir().glob("*.toml"))}


# Cards read from a path in this process: name -> (resolved file, card).
_ADDED: dict[str, tuple[Path, DatasetCard]] = {}

# A card read from a path names rows, run names and files: lowercase letters, digits, _ and -.
CARD_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


def card_path(text: str) -> Path | None:
    """The card file a name-or-path word names (it ends in ``.toml`` or holds a ``/``),
    resolved; None for a card name.

    >>> card_path("dtd") is None, card_path("cards/mine.toml").name
    (True, 'mine.toml')
    """
    if text.lower().endswith(".toml") or "/" in text:
        return Path(text).expanduser().resolve()
    return None


def check_card_name(
    name: str, path: Path, *, shipped: Collection[str], added: Mapping[str, Any], what: str
) -> None:
    """UsageError unless a card read from ``path`` may join the ``shipped`` and ``added``
    (name -> (file, card)) cards under ``name``: a plain name, neither one of fpl-bench's own
    nor another file's card read in this process (rows under one name would be ambiguous)."""
    if not CARD_NAME.fullmatch(name):
        raise UsageError(
            f"bad card {path}: name {name!r} must be lowercase letters, digits, '_' or '-' "
            f"(it names the {what}'s rows and files); rename the file and its name"
        )
    if name in shipped:
        raise UsageError(
            f"bad card {path}: name {name!r} is fpl-bench's own {what}; give your card "
            "another name (and file stem)"
        )
    if name in added and added[name][0] != path:
        raise UsageError(
            f"bad card {path}: name {name!r} is already the card {added[name][0]} in this job; "
            "rename one of them"
        )


def add_card(path: Path) -> DatasetCard:
    """Read the dataset card file ``path`` (validated like a shipped card) into this process's
    cards under its name, and return it (open_clip's ``add_model_config``)."""
    path = Path(path).expanduser().resolve()
    for file, card in _ADDED.values():
        if file == path:  # read once per process, as the shipped cards are
            return card
    if not path.is_file():
        why = "a folder, not a card file" if path.is_dir() else "no such file"
        raise UsageError(f"dataset card {path}: {why}")
    card = load_card(path)
    check_card_name(card.name, path, shipped=dataset_cards(), added=_ADDED, what="dataset")
    _ADDED[card.name] = (path, card)
    return card


def added_card_file(name: str) -> Path | None:
    """The file a card read from a path in this process came from, or None."""
    return _ADDED[name][0] if name in _ADDED else None


def dataset_card(name: str) -> DatasetCard:
    """The card named ``name``, or read from the file ``name`` names (``card_path``); an
    unknown name lists the known ones."""
    path = card_path(name)
    if path is not None:
        return add_card(path)
    if name in _ADDED:
        return _ADDED[name][1]
    cards = dataset_cards()
    if name not in cards:
        raise UsageError(
            f"unknown dataset {name!r}; known: {', '.join(cards)} (or a card file, PATH.toml)"
        )
    return cards[name]
