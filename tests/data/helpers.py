"""Builders of tiny on-disk datasets for the data tests: CoOp folders, CIFAR pickles, domains."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fpl_bench.data.catalog import DatasetCard, parse_card

CLASSES = ("cat", "dog", "fox")


def write_image(path: Path, *, size: tuple[int, int] = (12, 10), value: int = 100) -> None:
    """A small solid-colour image; the suffix picks the format (PNG or JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 40)).save(path)


def tiny_card(**source: Any) -> DatasetCard:
    """A 3-class CoOp-layout card (``tiny/images``, ``split_zhou_Tiny.json``), fields overridable."""
    src = {
        "kind": "coop",
        "dataset_dir": "tiny",
        "image_dir": "images",
        "split_file": "split_zhou_Tiny.json",
        "fallback": "class_folders",
        **source,
    }
    return parse_card(
        {
            "name": "tiny",
            "summary": "three classes",
            "classes": 3,
            "layout": "tiny/\n  images/<class>/*.png\n",
            "url": "https://example.org/tiny",
            "obtain": "build it in the test",
            "citation": "none",
            "partition": "pathological",
            "source": src,
        },
        where="tiny.toml",
    )


def coop_folder(
    root: Path, *, per_class: int = 4, with_json: bool = True, classes: tuple[str, ...] = CLASSES
) -> dict[str, list[list[Any]]]:
    """``root/tiny/images/<class>/<class>_<i>.{png,jpg}`` of varying sizes, and a CoOp split JSON.

    Split (when written): per class, images 0-1 train, 2 val, the rest test. Returns the split.
    """
    image_dir = root / "tiny" / "images"
    split: dict[str, list[list[Any]]] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(classes):
        for i in range(per_class):
            rel = f"{name}/{name}_{i}.{'png' if i % 2 else 'jpg'}"
            write_image(image_dir / rel, size=(8 + 3 * i, 20 - 2 * label), value=30 * label + i)
            part = "train" if i < 2 else "val" if i == 2 else "test"
            split[part].append([rel, label, name])
    if with_json:
        (root / "tiny" / "split_zhou_Tiny.json").write_text(json.dumps(split))
    return split


def write_split(root: Path, split: dict[str, list[list[Any]]]) -> None:
    (root / "tiny" / "split_zhou_Tiny.json").write_text(json.dumps(split))


def _pickle_like_cifar(obj: dict[str, Any], path: Path) -> None:
    """Protocol 2 with numpy's arrays under ``numpy.core.multiarray``, as the published files."""
    blob = pickle.dumps(obj, protocol=2).replace(
        b"numpy._core.multiarray", b"numpy.core.multiarray"
    )
    path.write_bytes(blob)


def cifar_images(n: int, start: int = 0) -> np.ndarray:
    """Rows of torchvision's format [n, 3072] (R plane, G plane, B plane); image i: R = start + i."""
    data = np.zeros((n, 3, 32, 32), np.uint8)
    data[:, 0] = (start + np.arange(n))[:, None, None]
    data[:, 1] = 7
    data[:, 2, 0, 1] = 9  # one blue pixel at row 0, column 1
    return data.reshape(n, 3072)


def write_cifar10(root: Path, *, per_batch: int = 10) -> Path:
    """``root/cifar-10-batches-py`` with 5 train batches and a test batch of ``per_batch`` images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(1, 6):
        labels = [i % 10 for i in range(per_batch)]
        batch = {
            "batch_label": f"training batch {b} of 5",
            "labels": labels,
            "data": cifar_images(per_batch, start=(b - 1) * per_batch),
            "filenames": [f"img_{b}_{i}.png" for i in range(per_batch)],
        }
        _pickle_like_cifar(batch, folder / f"data_batch_{b}")
    test = {
        "batch_label": "testing batch 1 of 1",
        "labels": [i % 10 for i in range(per_batch)],
        "data": cifar_images(per_batch, start=200),
        "filenames": [f"test_{i}.png" for i in range(per_batch)],
    }
    _pickle_like_cifar(test, folder / "test_batch")
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    meta = {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072}
    _pickle_like_cifar(meta, folder / "batches.meta")
    return folder


def write_cifar100(root: Path, *, n_train: int = 200, n_test: int = 100) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        part = {
            "filenames": [f"{name}_{i}.png" for i in range(n)],
            "batch_label": f"{name} batch",
            "fine_labels": [i % 100 for i in range(n)],
            "coarse_labels": [i % 20 for i in range(n)],
            "data": cifar_images(n),
        }
        _pickle_like_cifar(part, folder / name)
    meta = {
        "fine_label_names": [f"class_{i}" for i in range(100)],
        "coarse_label_names": [f"super_{i}" for i in range(20)],
    }
    _pickle_like_cifar(meta, folder / "meta")
    return folder


def domain_card(**source: Any) -> DatasetCard:
    """A 2-domain, 2-class card over ``root/toydom/<domain>/<class>/``."""
    src = {
        "kind": "domains",
        "dataset_dir": "toydom",
        "domains": ["photo", "sketch"],
        "classnames": ["ice_cream", "zebra"],
        **source,
    }
    return parse_card(
        {
            "name": "toydom",
            "summary": "two domains",
            "classes": 2,
            "layout": "toydom/\n  <domain>/<class>/*.png\n",
            "url": "https://example.org/toydom",
            "obtain": "build it in the test",
            "citation": "none",
            "partition": "by_domain",
            "source": src,
        },
        where="toydom.toml",
    )


def domain_folder(root: Path, *, per_class: int = 5) -> None:
    """``root/toydom/{photo,sketch}/{ice_cream,zebra,other}/*.png`` (``other`` is not a class)."""
    for d, domain in enumerate(("photo", "sketch")):
        for c, name in enumerate(("ice_cream", "zebra", "other")):
            for i in range(per_class):
                write_image(root / "toydom" / domain / name / f"{i}.png", value=50 * d + 10 * c + i)


# -- FGVC-Aircraft and ImageNet as CoOp lays them out -----------------------------------------

VARIANTS = ("707-320", "Cessna 172", "F-16A/B")  # names with a space and a slash, as in the file


def _card(
    name: str, classes: int, layout: str, source: dict[str, Any], **fields: Any
) -> DatasetCard:
    return parse_card(
        {
            "name": name,
            "summary": f"{classes} classes",
            "classes": classes,
            "layout": layout,
            "url": f"https://example.org/{name}",
            "obtain": "build it in the test",
            "citation": "none",
            "partition": "pathological",
            "source": source,
            **fields,
        },
        where=f"{name}.toml",
    )


def aircraft_card(**source: Any) -> DatasetCard:
    """A 3-variant card over ``root/planes/`` laid out as the shipped ``fgvc_aircraft`` card."""
    src = {
        "kind": "aircraft",
        "dataset_dir": "planes",
        "image_dir": "images",
        "classes_file": "variants.txt",
        "train_list": "images_variant_train.txt",
        "val_list": "images_variant_val.txt",
        "test_list": "images_variant_test.txt",
        "image_suffix": ".jpg",
        **source,
    }
    return _card("planes", 3, "planes/\n  images/<id>.jpg\n  variants.txt\n", src)


def aircraft_folder(
    root: Path, *, counts: tuple[int, int, int] = (3, 1, 2), variants: tuple[str, ...] = VARIANTS
) -> dict[str, list[tuple[str, str]]]:
    """``root/planes/`` with ``variants.txt``, the three lists and ``images/<id>.jpg``.

    Per variant, ``counts`` images in train, val, test (ids ``<label:02d><tr|va|te><i>``, in
    list order). Returns each split's ``(image id, variant)`` lines.
    """
    folder = root / "planes"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "variants.txt").write_text("".join(f"{v}\n" for v in variants))
    lines: dict[str, list[tuple[str, str]]] = {}
    for split, n in zip(("train", "val", "test"), counts, strict=True):
        lines[split] = [
            (f"{label:02d}{split[:2]}{i}", v) for label, v in enumerate(variants) for i in range(n)
        ]
        for k, (image_id, _) in enumerate(lines[split]):
            write_image(folder / "images" / f"{image_id}.jpg", size=(9 + k, 7), value=10 + k)
        write_aircraft_list(root, split, lines[split])
    return lines


def write_aircraft_list(root: Path, split: str, lines: list[tuple[str, str]]) -> None:
    text = "".join(f"{image_id} {variant}\n" for image_id, variant in lines)
    (root / "planes" / f"images_variant_{split}.txt").write_text(text)


WNIDS = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}


def imagenet_card(**source: Any) -> DatasetCard:
    """A 3-class card over ``root/inet/`` laid out as the shipped ``imagenet`` card."""
    src = {
        "kind": "imagenet",
        "dataset_dir": "inet",
        "image_dir": "images",
        "classes_file": "classnames.txt",
        "train_dir": "train",
        "test_dir": "val",
        **source,
    }
    defaults = {"seed": 0, "val_fraction": 0.25}
    return _card("inet", 3, "inet/\n  images/train/<wnid>/*.JPEG\n", src, defaults=defaults)


def imagenet_folder(
    root: Path, *, n_train: int = 8, n_val: int = 2, wnids: dict[str, str] = WNIDS
) -> None:
    """``root/inet/images/{train,val}/<wnid>/*.JPEG`` and ``classnames.txt``.

    The class-name file lists the classes in reverse order and one class with no folder (as
    CoOp's 1000-line file over a subset): labels must follow the sorted folders all the same.
    """
    folder = root / "inet"
    for c, wnid in enumerate(sorted(wnids)):
        for part, n in (("train", n_train), ("val", n_val)):
            for i in range(n):
                name = f"{wnid}_{i}.JPEG" if part == "train" else f"ILSVRC2012_val_{c}{i}.JPEG"
                write_image(
                    folder / "images" / part / wnid / name, size=(8 + i, 6), value=c * 20 + i
                )
    lines = [f"{wnid} {name}\n" for wnid, name in sorted(wnids.items(), reverse=True)]
    (folder / "classnames.txt").write_text("".join(lines) + "n99999999 not a folder here\n")
