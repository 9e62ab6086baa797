"""preprocessed_batches: a backbone's own transform over in-memory and file-backed sets."""

import numpy as np
import pytest
import torch

from fpl_bench.data.imageset import ImageSet
from fpl_bench.data.loading import preprocessed_batches
from fpl_bench.errors import UsageError
from tests.data.helpers import write_image


def to_tensor_8x8(image):
    """A stand-in for open_clip's eval transform: resize to 8x8, [3, 8, 8] float in [0, 1]."""
    array = np.asarray(image.resize((8, 8)), dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1)


def _files(tmp_path, n=7):
    for i in range(n):
        write_image(tmp_path / f"{i}.png", size=(5 + 3 * i, 9), value=20 * i)
    return ImageSet(
        labels=np.zeros(n, np.int64), paths=[f"{i}.png" for i in range(n)], root=tmp_path
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_in_order_and_sized(tmp_path, workers):
    images = _files(tmp_path)
    batches = list(preprocessed_batches(images, to_tensor_8x8, batch_size=3, workers=workers))
    assert [b.shape for b in batches] == [(3, 3, 8, 8), (3, 3, 8, 8), (1, 3, 8, 8)]
    red = torch.cat(batches)[:, 0, 4, 4] * 255
    assert torch.allclose(red, torch.arange(7) * 20.0, atol=1)


def test_in_memory_sets_go_through_the_same_transform():
    pixels = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    (batch,) = preprocessed_batches(ImageSet(labels=[0, 1], images=pixels), to_tensor_8x8)
    assert batch.shape == (2, 3, 8, 8)


def test_an_unreadable_file_is_a_usage_error(tmp_path):
    images = _files(tmp_path, n=3)
    (tmp_path / "2.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(UsageError, match=r"cannot read image .*2\.png"):
        list(preprocessed_batches(images, to_tensor_8x8, batch_size=2))
