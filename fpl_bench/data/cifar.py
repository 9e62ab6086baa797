"""CIFAR-10 and CIFAR-100 from torchvision's on-disk format, read without trusting pickle.

Layout (torchvision ``torchvision/datasets/cifar.py``, ``CIFAR10``/``CIFAR100``; never
downloaded here): ``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``
and ``<root>/cifar-100-python/{train, test, meta}``. Each batch is a Python-2 pickle of a dict
with ``data`` (a numpy uint8 array [N, 3072], channel-major 32x32 RGB), ``labels`` (CIFAR-10) or
``fine_labels`` (CIFAR-100) and ``filenames``; the meta file holds ``label_names`` /
``fine_label_names``. torchvision reads them with ``pickle.load(f, encoding="latin1")``.

A generic ``pickle.load`` runs whatever a file asks for, so these files are read with
``SafeUnpickler``: it resolves only numpy's array-rebuilding globals (``_reconstruct``,
``ndarray``, ``dtype``, ``_frombuffer``) and ``_codecs.encode`` restricted to latin-1 (how
Python 3 writes bytes at protocol 2); any other global is refused. The result is then checked
for shape and dtype (uint8 only, so no object array survives).

Splits: train = the training batches minus a seeded, per-class ``val_fraction`` holdout (val),
test = the test batch. CIFAR has no official val split; the holdout keeps tuning off test.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import numpy as np

from fpl_bench.data.catalog import CifarSource, DatasetCard
from fpl_bench.data.folders import holdout, val_fraction
from fpl_bench.data.imageset import ImageSet, Splits
from fpl_bench.data.options import check_options
from fpl_bench.data.problems import Problem, raise_problems

__all__ = [
    "FILES",
    "OPTIONS",
    "CifarScan",
    "SafeUnpickler",
    "load_cifar",
    "safe_load",
    "scan_cifar",
]

OPTIONS = {"seed": 0, "val_fraction": 0.1}

# variant -> (train files, test file, meta file, label key, label-names key)
FILES: dict[str, tuple[tuple[str, ...], str, str, str, str]] = {
    "cifar10": (
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": (("train",), "test", "meta", "fine_labels", "fine_label_names"),
}

_PIXELS = 32 * 32 * 3


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of bytes use it: latin-1 only."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's ``_reconstruct`` for plain ndarrays only."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("only numpy.ndarray may be rebuilt")
    return _NUMPY_RECONSTRUCT(np.ndarray, shape, dtype)


_NUMPY_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy.(_)core.multiarray._reconstruct
_NUMPY_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # numpy.(_)core.numeric._frombuffer


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds plain data and numpy arrays, and refuses every other global."""

    ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.numeric", "_frombuffer"): _NUMPY_FROMBUFFER,
        ("numpy._core.numeric", "_frombuffer"): _NUMPY_FROMBUFFER,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None


# What a corrupt or hostile pickle raises while being read: reported, never a traceback.
_PICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    AttributeError,
    OverflowError,
    UnicodeDecodeError,
)


def safe_load(path: Path) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys (``SafeUnpickler``, latin-1 like torchvision)."""
    with open(path, "rb") as f:
        obj = SafeUnpickler(f, encoding="latin1").load()
    if not isinstance(obj, dict):
        raise ValueError(f"holds a {type(obj).__name__}, not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


@dataclass
class CifarScan:
    """What reading a CIFAR folder found: arrays per part (train, test) and problems."""

    images: dict[str, np.ndarray] = field(default_factory=dict)  # [N, 32, 32, 3] uint8
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # [N] int64
    classnames: tuple[str, ...] = ()
    files: list[Path] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def _read_batch(
    path: Path, where: str, label_key: str, n_classes: int
) -> tuple[np.ndarray | None, np.ndarray | None, list[Problem]]:
    try:
        batch = safe_load(path)
        data, labels = batch["data"], batch[label_key]
    except OSError as err:
        return None, None, [Problem("unreadable", where, f"cannot read: {err.strerror}")]
    except _PICKLE_ERRORS as err:
        return None, None, [Problem("unreadable", where, f"not a CIFAR batch: {err}")]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        return None, None, [Problem("unreadable", where, "`data` is not a uint8 [N, 3072] array")]
    labels = np.asarray(labels)
    if data.shape[1] != _PIXELS or labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        detail = f"data {data.shape} / labels {labels.shape} {labels.dtype} do not match"
        return None, None, [Problem("unreadable", where, detail)]
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if bad.size:
        detail = f"{bad.size} labels outside [0, {n_classes}), e.g. {int(labels[bad[0]])}"
        return None, None, [Problem("bad_label", where, detail)]
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # as torchvision: CHW -> HWC
    return np.ascontiguousarray(images), labels.astype(np.int64), []


def scan_cifar(card: DatasetCard, root: Path) -> CifarScan:
    """Read (safely) every file of a CIFAR folder, collecting problems instead of raising."""
    src = card.source
    assert isinstance(src, CifarSource)
    train_files, test_file, meta_file, label_key, names_key = FILES[src.variant]
    folder = Path(root) / src.folder
    scan = CifarScan()
    if not folder.is_dir():
        scan.problems.append(
            Problem("missing", src.folder, f"no folder {src.folder}/ under {root}")
        )
        return scan
    names = [*train_files, test_file, meta_file]
    absent = [n for n in names if not (folder / n).is_file()]
    if absent:
        where = str(PurePosixPath(src.folder, absent[0]))
        scan.problems.append(Problem("missing", where, f"missing {', '.join(absent)}"))
        return scan
    scan.files = [folder / n for n in names]
    scan.classnames = _classnames(
        folder / meta_file, f"{src.folder}/{meta_file}", names_key, card, scan
    )
    for part, files in (("train", train_files), ("test", (test_file,))):
        parts = [
            _read_batch(folder / n, f"{src.folder}/{n}", label_key, card.classes) for n in files
        ]
        for _, _, problems in parts:
            scan.problems.extend(problems)
        if all(p[0] is not None for p in parts):
            scan.images[part] = np.concatenate([p[0] for p in parts])  # type: ignore[misc]
            scan.labels[part] = np.concatenate([p[1] for p in parts])  # type: ignore[misc]
    return scan


def _classnames(
    path: Path, where: str, key: str, card: DatasetCard, scan: CifarScan
) -> tuple[str, ...]:
    try:
        names = safe_load(path)[key]
    except OSError as err:
        scan.problems.append(Problem("unreadable", where, f"cannot read: {err.strerror}"))
        return ()
    except _PICKLE_ERRORS as err:
        scan.problems.append(Problem("unreadable", where, f"not a CIFAR meta file: {err}"))
        return ()
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        scan.problems.append(Problem("unreadable", where, f"`{key}` is not a list of names"))
        return ()
    if len(names) != card.classes:
        detail = f"{len(names)} class names, but the card says {card.classes}"
        scan.problems.append(Problem("classname_mismatch", where, detail))
    return tuple(names)


def _fingerprint(card: DatasetCard, files: list[Path], opts: Mapping[str, Any]) -> str:
    stats = []
    for path in files:
        st = os.stat(path)
        stats.append([path.name, st.st_size, st.st_mtime_ns])
    payload = {"kind": "cifar", "dataset": card.name, "files": stats, **opts}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def load_cifar(card: DatasetCard, root: Path, options: Mapping[str, Any]) -> Splits:
    """In-memory Splits of CIFAR-10/100 (train minus a val holdout, val, test)."""
    opts = check_options(card.name, options, OPTIONS)
    fraction = val_fraction(card.name, opts["val_fraction"])
    scan = scan_cifar(card, root)
    raise_problems(card.name, Path(root), scan.problems)
    images, labels = scan.images["train"], scan.labels["train"]
    val = holdout(labels, fraction=fraction, seed=opts["seed"])
    train = np.setdiff1d(np.arange(labels.size), val)
    return Splits(
        classnames=scan.classnames,
        train=ImageSet(labels=labels[train], images=images[train]),
        val=ImageSet(labels=labels[val], images=images[val]),
        test=ImageSet(labels=scan.labels["test"], images=scan.images["test"]),
        fingerprint=_fingerprint(card, scan.files, opts),
        domain_names=(card.name,),
    )
