"""What every data source returns: labelled image sets (in memory or on disk) and their splits.

An ``ImageSet`` holds N labelled images in one of two forms:

- **in memory**: ``images`` is a uint8 array [N, H, W, 3] (the synthetic and CIFAR sources);
- **file-backed**: ``paths`` are POSIX paths relative to ``root`` (the CoOp-layout and domain
  sources, whose images differ in size); ``pil_images`` decodes a chunk to RGB PIL images for a
  backbone's own preprocess transform (see ``fpl_bench.data.loading.preprocessed_batches``).

Every image also carries a domain id (``domains`` [N] int64, all 0 for a one-domain source);
``Splits.domain_names`` names them, so the cross-domain and multi-domain protocols and the
``ByDomain`` partitioner can use them.

``Splits.fingerprint`` identifies the content: the synthetic source hashes its generation
parameters, file-backed sources hash the split lists with each file's size and mtime
(``file_fingerprint``), CIFAR hashes its batch files' sizes and mtimes and the val holdout. The
feature cache is keyed by it, so a changed image, split or class order is never served stale.

>>> s = ImageSet(images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.array([0, 1]))
>>> len(s), s.file_backed, s.domains.tolist()
(2, False, [0, 0])
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from fpl_bench.errors import UsageError

__all__ = ["SPLITS", "ImageSet", "Splits", "file_fingerprint", "open_rgb"]

SPLITS: tuple[str, ...] = ("train", "val", "test")

# What PIL raises for a file it cannot read as an image (missing, truncated, not an image, a
# decompression bomb); anything else escaping a decode is a bug.
DECODE_ERRORS = (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError)


def _int_array(name: str, a: Any) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"{name} must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    out = arr.astype(np.int64, copy=True)
    out.setflags(write=False)
    return out


def open_rgb(path: Path) -> Image.Image:
    """Decode one image file to an RGB PIL image (grey, palette and RGBA are converted).

    An unreadable file is a UsageError naming it, never a traceback.
    """
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except DECODE_ERRORS as err:
        raise UsageError(
            f"cannot read image {path}: {err}; run `fpl-bench data check` on the data root"
        ) from None


@dataclass(frozen=True, eq=False)
class ImageSet:
    """N labelled images, in memory or file-backed, each with a domain id.

    Attributes:
        labels: [N] int64 class ids (indices into ``Splits.classnames``).
        images: [N, H, W, 3] uint8, or None for a file-backed set.
        paths: N POSIX paths relative to ``root``, or None for an in-memory set.
        root: the folder ``paths`` are relative to (absolute, resolved), file-backed only.
        domains: [N] int64 domain ids (indices into ``Splits.domain_names``); None means 0.
    """

    labels: np.ndarray
    images: np.ndarray | None = None
    paths: tuple[str, ...] | None = None
    root: Path | None = None
    domains: np.ndarray | None = None

    def __post_init__(self) -> None:
        labels = _int_array("labels", self.labels)
        object.__setattr__(self, "labels", labels)
        n = labels.size
        if (self.images is None) == (self.paths is None):
            raise ValueError("an ImageSet holds either `images` (in memory) or `paths` (files)")
        if self.images is not None:
            images = np.asarray(self.images)
            if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
                raise ValueError(
                    f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}"
                )
            if len(images) != n:
                raise ValueError(f"{len(images)} images but {n} labels")
            object.__setattr__(self, "images", images)
        else:
            paths = tuple(str(p) for p in self.paths or ())
            if len(paths) != n:
                raise ValueError(f"{len(paths)} paths but {n} labels")
            if self.root is None:
                raise ValueError("a file-backed ImageSet needs `root`")
            object.__setattr__(self, "paths", paths)
            object.__setattr__(self, "root", Path(self.root))
        domains = np.zeros(n, np.int64) if self.domains is None else self.domains
        domains = _int_array("domains", domains)
        if domains.size != n:
            raise ValueError(f"{domains.size} domain ids but {n} labels")
        object.__setattr__(self, "domains", domains)

    def __len__(self) -> int:
        return int(self.labels.size)

    @property
    def file_backed(self) -> bool:
        """True when the images live on disk (``paths``), False when in memory (``images``)."""
        return self.paths is not None

    def path(self, i: int) -> Path:
        """Absolute path of image ``i`` of a file-backed set."""
        if self.paths is None or self.root is None:
            raise TypeError("path(): this ImageSet holds its images in memory")
        return self.root / self.paths[i]

    def pil_images(self, indices: Iterable[int]) -> list[Image.Image]:
        """Decode the images at ``indices`` to RGB PIL images (what a preprocess transform takes).

        In-memory images are wrapped with ``Image.fromarray``; file-backed ones are read from
        disk. An unreadable file is a UsageError naming its path.
        """
        if self.images is not None:
            return [Image.fromarray(self.images[i]) for i in indices]
        return [open_rgb(self.path(i)) for i in indices]

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSet:
        """The images at ``indices`` (in that order), as a new ImageSet of the same form."""
        idx = np.asarray(indices, dtype=np.int64)
        if self.images is not None:
            return ImageSet(
                labels=self.labels[idx], images=self.images[idx], domains=self.domains[idx]
            )
        assert self.paths is not None
        return ImageSet(
            labels=self.labels[idx],
            paths=tuple(self.paths[i] for i in idx.tolist()),
            root=self.root,
            domains=self.domains[idx],
        )


@dataclass(frozen=True, eq=False)
class Splits:
    """Train/val/test of one dataset: what ``load_source`` returns for every kind.

    Attributes:
        classnames: name of each class id, as the text encoder reads it.
        train, val, test: the three image sets.
        fingerprint: sha256 hex identifying the content (see the module docstring).
        domain_names: name of each domain id; one name for a one-domain source.
    """

    classnames: tuple[str, ...]
    train: ImageSet
    val: ImageSet
    test: ImageSet
    fingerprint: str
    domain_names: tuple[str, ...] = ("default",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classnames", tuple(self.classnames))
        object.__setattr__(self, "domain_names", tuple(self.domain_names))
        for split in SPLITS:
            s: ImageSet = getattr(self, split)
            if len(s) and (s.labels.min() < 0 or s.labels.max() >= len(self.classnames)):
                raise ValueError(f"{split} labels fall outside [0, {len(self.classnames)})")
            if len(s) and (s.domains.min() < 0 or s.domains.max() >= len(self.domain_names)):
                raise ValueError(f"{split} domain ids fall outside [0, {len(self.domain_names)})")


def file_fingerprint(
    *,
    kind: str,
    sets: Mapping[str, ImageSet],
    classnames: Sequence[str],
    domain_names: Sequence[str],
    extra: Mapping[str, Any] | None = None,
) -> str:
    """sha256 hex of file-backed splits: every (path, label, domain, size, mtime_ns), in order.

    The sets' ``root`` is not hashed, so moving the data folder (mtimes kept) keeps the cached
    features. A listed file that cannot be stat'ed is a UsageError naming it.
    """
    h = hashlib.sha256()
    head = {
        "kind": kind,
        "classnames": list(classnames),
        "domain_names": list(domain_names),
        "extra": dict(extra or {}),
    }
    h.update(json.dumps(head, sort_keys=True).encode())
    for split, image_set in sets.items():
        h.update(f"\n#{split}\n".encode())
        assert image_set.paths is not None and image_set.root is not None
        root = image_set.root
        for rel, label, domain in zip(
            image_set.paths, image_set.labels.tolist(), image_set.domains.tolist(), strict=True
        ):
            try:
                st = os.stat(root / rel)
            except OSError as err:
                raise UsageError(
                    f"cannot stat image {root / rel}: {err.strerror}; run `fpl-bench data check`"
                ) from None
            h.update(f"{rel}\t{label}\t{domain}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
