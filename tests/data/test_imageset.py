"""ImageSet (in memory or file-backed, with domain ids) and Splits validation."""

import numpy as np
import pytest

from fpl_bench.data.imageset import ImageSet, Splits, file_fingerprint
from fpl_bench.errors import UsageError
from tests.data.helpers import write_image


def _files(tmp_path, n=3):
    for i in range(n):
        write_image(tmp_path / "a" / f"{i}.png", size=(5 + i, 7), value=10 * i)
    return ImageSet(
        labels=np.arange(n) % 2, paths=tuple(f"a/{i}.png" for i in range(n)), root=tmp_path
    )


def test_in_memory_set_defaults_domain_zero_and_decodes_to_pil():
    s = ImageSet(labels=[1, 0], images=np.full((2, 4, 4, 3), 9, np.uint8))
    assert len(s) == 2 and not s.file_backed
    assert s.domains.tolist() == [0, 0] and s.labels.dtype == np.int64
    (im,) = s.pil_images([1])
    assert im.mode == "RGB" and im.size == (4, 4)


def test_file_backed_set_decodes_images_of_any_size_to_rgb(tmp_path):
    s = _files(tmp_path)
    assert s.file_backed and s.path(2) == tmp_path / "a" / "2.png"
    assert [im.size for im in s.pil_images(range(3))] == [(5, 7), (6, 7), (7, 7)]
    assert {im.mode for im in s.pil_images([0])} == {"RGB"}


def test_unreadable_file_is_a_usage_error_naming_it(tmp_path):
    s = _files(tmp_path)
    (tmp_path / "a" / "1.png").write_bytes(b"not an image")
    with pytest.raises(UsageError, match=r"cannot read image .*1\.png"):
        s.pil_images([1])


def test_subset_keeps_form_labels_and_domains(tmp_path):
    s = _files(tmp_path)
    s = ImageSet(labels=s.labels, paths=s.paths, root=s.root, domains=[0, 1, 1])
    sub = s.subset([2, 0])
    assert sub.paths == ("a/2.png", "a/0.png") and sub.domains.tolist() == [1, 0]
    mem = ImageSet(labels=[0, 1, 2], images=np.arange(3 * 12, dtype=np.uint8).reshape(3, 2, 2, 3))
    assert mem.subset([1]).images[0, 0, 0, 0] == 12


@pytest.mark.parametrize(
    "kwargs",
    [
        {"labels": [0, 1]},  # neither images nor paths
        {"labels": [0], "images": np.zeros((2, 4, 4, 3), np.uint8)},
        {"labels": [0], "images": np.zeros((1, 4, 4), np.uint8)},
        {"labels": [0], "paths": ("x.png",)},  # no root
        {"labels": [0], "images": np.zeros((1, 2, 2, 3), np.uint8), "domains": [0, 1]},
    ],
)
def test_inconsistent_image_sets_are_refused(kwargs):
    with pytest.raises(ValueError):
        ImageSet(**kwargs)


def test_splits_refuse_labels_or_domains_out_of_range():
    ok = ImageSet(labels=[0, 1], images=np.zeros((2, 2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="labels"):
        Splits(classnames=("a",), train=ok, val=ok, test=ok, fingerprint="f")
    far = ImageSet(labels=[0, 1], images=np.zeros((2, 2, 2, 3), np.uint8), domains=[0, 2])
    with pytest.raises(ValueError, match="domain"):
        Splits(classnames=("a", "b"), train=far, val=ok, test=ok, fingerprint="f")


def test_file_fingerprint_follows_content_and_lists(tmp_path):
    s = _files(tmp_path)

    def digest(image_set=s, names=("x", "y")):
        sets = {"train": image_set, "val": image_set.subset([]), "test": image_set.subset([0])}
        return file_fingerprint(kind="coop", sets=sets, classnames=names, domain_names=("d",))

    base = digest()
    assert digest() == base
    assert digest(names=("x", "z")) != base
    assert digest(s.subset([1, 0, 2])) != base
    write_image(tmp_path / "a" / "1.png", size=(40, 40))  # new size and mtime
    assert digest() != base
    (tmp_path / "a" / "1.png").unlink()
    with pytest.raises(UsageError, match="cannot stat image"):
        digest()
