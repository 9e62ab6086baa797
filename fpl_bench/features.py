"""Frozen image-feature cache.

The image encoder is frozen, so each image is encoded once per (backbone, weights, preprocessing,
dataset content, split) and reused across rounds, clients, methods and runs. Entries live on disk
under `cache_dir/features/<key>.pt`, keyed by a SHA-256 of all of those, written atomically and
read back with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fpl_bench.data.imageset import ImageSet
from fpl_bench.data.loading import preprocessed_batches
from fpl_bench.io import write_atomic

FORMAT_VERSION = 2  # 2: entries carry the SHA-256 of their tensors


def tensor_digest(*tensors: Tensor) -> str:
    """SHA-256 over the shapes, dtypes and bytes of `tensors` (what a cache entry must hold)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.contiguous().cpu()
        h.update(f"{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(
    *, backbone: str, tag: str, weights: str, preprocess: dict[str, Any], data: str, split: str
) -> str:
    """Content hash naming one cache entry (hex, 24 chars)."""
    blob = json.dumps(
        {
            "v": FORMAT_VERSION,
            "backbone": backbone,
            "tag": tag,
            "weights": weights,
            "preprocess": preprocess,
            "data": data,
            "split": split,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def save_atomic(obj: dict[str, Tensor], path: Path) -> None:
    """torch.save, written atomically (never a half-written cache entry)."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def image_features(
    backbone: Any,
    images: np.ndarray | ImageSet,
    *,
    data_fingerprint: str,
    split: str,
    cache_dir: Path,
    with_tokens: bool = True,
    batch_size: int = 256,
    workers: int = 0,
) -> tuple[Tensor, Tensor, bool]:
    """(pooled [N, D] float32, patch tokens [N, P, D] float16, cache hit?) for one split.

    Patch tokens are extracted (and cached) only `with_tokens` (learners that score patches,
    such as FedOTP's); otherwise they are an empty [N, 0, D] tensor and any visual tower works.
    `images` is a uint8 array [N, H, W, 3] or an ImageSet; a file-backed ImageSet is decoded in
    chunks (`workers` threads) through the backbone's own preprocess transform.
    """
    name = split if with_tokens else f"{split}/pooled"
    path = _entry_path(backbone, data_fingerprint, name, cache_dir)
    hit = _load(path, ("pooled", "tokens"), len(images))
    if hit is not None:
        return hit[0], hit[1], True
    if isinstance(images, ImageSet) and images.file_backed:
        batches = preprocessed_batches(
            images, backbone.preprocess, batch_size=batch_size, workers=workers
        )
        pooled, tokens = backbone.encode_inputs(batches, n=len(images), with_tokens=with_tokens)
    else:
        array = images.images if isinstance(images, ImageSet) else images
        pooled, tokens = backbone.encode_images(array, with_tokens=with_tokens)
    pooled, tokens = pooled.float().cpu(), tokens.half().cpu()
    _save(path, {"pooled": pooled, "tokens": tokens})
    return pooled, tokens, False


def image_embeddings(
    backbone: Any,
    images: np.ndarray | ImageSet,
    *,
    data_fingerprint: str,
    split: str,
    cache_dir: Path,
    batch_size: int = 256,
    workers: int = 0,
) -> tuple[Tensor, bool]:
    """(the image tower's input tokens [N, 1 + P, W_v] float32, cache hit?) for one split:
    what a learner that prompts the image tower reads (fpl_bench/vision.py). float32, as the
    tower computes above them; the patch tokens of `image_features` are float16."""
    path = _entry_path(backbone, data_fingerprint, f"{split}/embedded", cache_dir)
    hit = _load(path, ("embedded",), len(images))
    if hit is not None:
        return hit[0], True
    if isinstance(images, ImageSet) and images.file_backed:
        batches = preprocessed_batches(
            images, backbone.preprocess, batch_size=batch_size, workers=workers
        )
        embedded = backbone.embed_inputs(batches, n=len(images))
    else:
        array = images.images if isinstance(images, ImageSet) else images
        embedded = backbone.embed_images(array)
    embedded = embedded.float().cpu()
    _save(path, {"embedded": embedded})
    return embedded, False


def _entry_path(backbone: Any, data_fingerprint: str, split: str, cache_dir: Path) -> Path:
    key = cache_key(
        backbone=backbone.name,
        tag=backbone.tag,
        weights=backbone.weights_digest,
        preprocess=backbone.preprocess_cfg,
        data=data_fingerprint,
        split=split,
    )
    return cache_dir / "features" / f"{key}.pt"


def _load(path: Path, names: tuple[str, ...], n: int) -> list[Tensor] | None:
    """The entry's tensors `names` when it is intact and holds n rows; None otherwise (a
    damaged entry is recomputed and overwritten)."""
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        tensors = [entry[name] for name in names]
        if entry["sha256"] == tensor_digest(*tensors) and tensors[0].shape[0] == n:
            return tensors
    except (RuntimeError, KeyError, EOFError, OSError, pickle.UnpicklingError):
        pass
    return None


def _save(path: Path, tensors: dict[str, Tensor]) -> None:
    """Written atomically: two processes filling the same entry at once leave one valid file."""
    save_atomic({**tensors, "sha256": tensor_digest(*tensors.values())}, path)
