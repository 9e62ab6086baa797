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
    key = cache_key(
        backbone=backbone.name,
        tag=backbone.tag,
        weights=backbone.weights_digest,
        preprocess=backbone.preprocess_cfg,
        data=data_fingerprint,
        split=split if with_tokens else f"{split}/pooled",
    )
    path = cache_dir / "features" / f"{key}.pt"
    if path.is_file():
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            intact = entry["sha256"] == tensor_digest(entry["pooled"], entry["tokens"])
            if intact and entry["pooled"].shape[0] == len(images):
                return entry["pooled"], entry["tokens"], True
        except (RuntimeError, KeyError, EOFError, OSError, pickle.UnpicklingError):
            pass  # a damaged entry is recomputed and overwritten
    if isinstance(images, ImageSet) and images.file_backed:
        batches = preprocessed_batches(
            images, backbone.preprocess, batch_size=batch_size, workers=workers
        )
        pooled, tokens = backbone.encode_inputs(batches, n=len(images), with_tokens=with_tokens)
    else:
        array = images.images if isinstance(images, ImageSet) else images
        pooled, tokens = backbone.encode_images(array, with_tokens=with_tokens)
    pooled, tokens = pooled.float().cpu(), tokens.half().cpu()
    # Written atomically: two processes filling the same entry at once leave one valid file.
    save_atomic({"pooled": pooled, "tokens": tokens, "sha256": tensor_digest(pooled, tokens)}, path)
    return pooled, tokens, False
