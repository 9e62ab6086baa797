"""CIFAR-10/100 from torchvision's pickles, read with the restricted unpickler only."""

import os
import pickle

import numpy as np
import pytest

from fpl_bench.data.catalog import dataset_card
from fpl_bench.data.cifar import SafeUnpickler, safe_load
from fpl_bench.data.sources import load_source
from fpl_bench.errors import UsageError
from tests.data.helpers import write_cifar10, write_cifar100


def _load(tmp_path, name="cifar10", **options):
    return load_source(
        dataset_card(name), root=tmp_path / "data", options=options, cache_dir=tmp_path / "c"
    )


def test_cifar10_loads_hwc_images_labels_and_names(tmp_path):
    write_cifar10(tmp_path / "data")
    s = _load(tmp_path, val_fraction=0.2)
    assert s.classnames[:3] == ("airplane", "automobile", "bird") and len(s.classnames) == 10
    assert (len(s.train), len(s.val), len(s.test)) == (40, 10, 10)
    assert np.bincount(s.val.labels).tolist() == [1] * 10  # per-class holdout
    for part in (s.train, s.val, s.test):
        assert part.images.shape[1:] == (32, 32, 3) and part.images.dtype == np.uint8
        assert not part.file_backed
    # channel-major rows became HWC: R = image index, G = 7, one blue pixel at (0, 1)
    assert s.test.images[3, 5, 5].tolist() == [203, 7, 0]
    assert s.test.images[3, 0, 1, 2] == 9
    train_r = np.sort(np.concatenate([s.train.images[:, 0, 0, 0], s.val.images[:, 0, 0, 0]]))
    assert train_r.tolist() == list(range(50))


def test_cifar_holdout_is_seeded_and_fingerprinted(tmp_path):
    write_cifar10(tmp_path / "data")
    a, b = _load(tmp_path, seed=1), _load(tmp_path, seed=1)
    c = _load(tmp_path, seed=2)
    assert np.array_equal(a.val.images, b.val.images) and a.fingerprint == b.fingerprint
    assert c.fingerprint != a.fingerprint
    assert len(_load(tmp_path, val_fraction=0.0).val) == 0


def test_cifar100_uses_fine_labels(tmp_path):
    write_cifar100(tmp_path / "data")
    s = _load(tmp_path, "cifar100")
    assert len(s.classnames) == 100 and s.classnames[5] == "class_5"
    assert len(s.train) + len(s.val) == 200 and len(s.test) == 100
    assert s.test.labels.max() == 99


class _Mkdir:
    """Pickles to a call of os.mkdir: what a hostile file would do instead of holding data."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_a_pickle_asking_for_any_other_global_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    folder = write_cifar10(tmp_path / "data")
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({"data": _Mkdir(marker), "labels": [0]}, f, protocol=2)
    with pytest.raises(
        UsageError, match=r"data_batch_2: not a CIFAR batch: global .* is not allowed"
    ):
        _load(tmp_path)
    assert not marker.exists()
    with open(folder / "data_batch_2", "rb") as f, pytest.raises(pickle.UnpicklingError):
        SafeUnpickler(f, encoding="latin1").load()
    assert not marker.exists()


def test_object_arrays_are_refused(tmp_path):
    folder = write_cifar10(tmp_path / "data")
    batch = {"data": np.array([[1, "a"]], dtype=object), "labels": [0]}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(UsageError, match="test_batch: `data` is not a uint8"):
        _load(tmp_path)


def test_protocol_5_arrays_load_too(tmp_path):
    path = tmp_path / "p5"
    path.write_bytes(pickle.dumps({"data": np.arange(6, dtype=np.uint8)}, protocol=5))
    assert safe_load(path)["data"].tolist() == list(range(6))


def test_missing_files_and_bad_labels(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(UsageError, match=r"no folder cifar-10-batches-py/"):
        _load(tmp_path)
    folder = write_cifar10(tmp_path / "data")
    (folder / "data_batch_4").unlink()
    with pytest.raises(UsageError, match="missing data_batch_4"):
        _load(tmp_path)
    folder = write_cifar10(tmp_path / "other")
    batch = safe_load(folder / "test_batch")
    batch["labels"][0] = 12
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(UsageError, match=r"bad_label: .*1 labels outside \[0, 10\)"):
        load_source(
            dataset_card("cifar10"), root=tmp_path / "other", options={}, cache_dir=tmp_path
        )


def test_unknown_option_and_bad_fraction(tmp_path):
    write_cifar10(tmp_path / "data")
    with pytest.raises(UsageError, match="has no option 'shots'"):
        _load(tmp_path, shots=3)
    with pytest.raises(UsageError, match=r"val_fraction=1\.5"):
        _load(tmp_path, val_fraction=1.5)
