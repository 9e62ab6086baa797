"""Decode an ImageSet in chunks and run a backbone's own preprocess transform on it.

The feature cache encodes each image once, so this runs once per (backbone, dataset, split):
``preprocessed_batches(image_set, backbone.preprocess)`` yields float tensors [B, 3, H, W]
ready for the image tower, in order, whatever the images' sizes on disk. The transform is any
callable PIL image -> [3, H, W] tensor (open_clip's eval transform is a torchvision Compose);
nothing here knows a backbone.

Decoding and resizing a JPEG release the GIL in Pillow, so ``workers > 0`` decodes a chunk on
that many threads (order kept); 0 decodes in the calling thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from torch import Tensor

from fpl_bench.data.imageset import ImageSet

__all__ = ["preprocessed_batches"]


def preprocessed_batches(
    images: ImageSet,
    transform: Callable[[Image.Image], Tensor],
    *,
    batch_size: int = 256,
    workers: int = 0,
) -> Iterator[Tensor]:
    """Yield ``transform``-ed images [B, 3, H, W] in chunks of ``batch_size``, in order.

    An unreadable file stops the iteration with a UsageError naming its path.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def one(i: int) -> Tensor:
        (image,) = images.pil_images([i])
        return transform(image)

    pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
    try:
        for start in range(0, len(images), batch_size):
            idx = range(start, min(start + batch_size, len(images)))
            tensors = list(pool.map(one, idx)) if pool is not None else [one(i) for i in idx]
            yield torch.stack(tensors)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
