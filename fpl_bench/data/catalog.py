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

>>> card = dataset_card("synthetic")
>>> card.kind, card.classes
('synthetic', 64)
"""

from __future__ import annotations

import tomllib
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
    "ImageNetSource",
    "SyntheticSource",
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


Source = Annotated[
    SyntheticSource | CoOpSource | AircraftSource | ImageNetSource | CifarSource | DomainSource,
    Field(discriminator="kind"),
]


class DatasetCard(_Strict):
    """One ``datasets/<name>.toml``: what the data is, where to get it, how it lies on disk.

    Attributes:
        name: the file stem, the ``--dataset`` value.
        summary: one line for ``fpl-bench datasets``.
        classes: number of classes the source must yield.
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
    classes: int = Field(ge=1)
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
        """The source kind: synthetic, coop, aircraft, imagenet, cifar or domains."""
        return self.source.kind

    @model_validator(mode="after")
    def _consistent(self) -> DatasetCard:
        src = self.source
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


def dataset_card(name: str) -> DatasetCard:
    """The card named ``name``; an unknown name lists the known ones."""
    cards = dataset_cards()
    if name not in cards:
        raise UsageError(f"unknown dataset {name!r}; known: {', '.join(cards)}")
    return cards[name]
