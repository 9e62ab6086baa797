"""CoOp folder layout: split_zhou JSON, the seeded class-folder fallback, refused paths."""

import json
import os

import numpy as np
import pytest

from fpl_bench.data.catalog import dataset_card
from fpl_bench.data.sources import load_source
from fpl_bench.errors import UsageError
from tests.data.helpers import CLASSES, coop_folder, tiny_card, write_image, write_split


def _load(card, root, cache, **options):
    return load_source(card, root=root, options=options, cache_dir=cache)


def test_split_json_gives_file_backed_splits_in_its_order(tmp_path):
    split = coop_folder(tmp_path / "data")
    s = _load(tiny_card(), tmp_path / "data", tmp_path / "cache")
    assert s.classnames == CLASSES and s.domain_names == ("tiny",)
    for name in ("train", "val", "test"):
        part = getattr(s, name)
        assert part.file_backed
        assert list(part.paths) == [e[0] for e in split[name]]
        assert part.labels.tolist() == [e[1] for e in split[name]]
        assert part.root == (tmp_path / "data" / "tiny" / "images").resolve()
    sizes = {im.size for im in s.train.pil_images(range(len(s.train)))}
    assert len(sizes) > 1  # images of different sizes, decoded as they are
    assert len(s.fingerprint) == 64


def test_the_fingerprint_changes_with_the_files_and_the_split(tmp_path):
    root = tmp_path / "data"
    split = coop_folder(root)
    first = _load(tiny_card(), root, tmp_path / "cache").fingerprint
    assert _load(tiny_card(), root, tmp_path / "cache").fingerprint == first
    write_image(root / "tiny" / "images" / "dog" / "dog_0.jpg", size=(30, 30))
    second = _load(tiny_card(), root, tmp_path / "cache").fingerprint
    assert second != first
    split["train"], split["val"] = split["val"], split["train"]
    write_split(root, split)
    assert _load(tiny_card(), root, tmp_path / "cache").fingerprint != second


def test_without_json_the_class_folders_are_split_seeded_into_the_cache_dir(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    coop_folder(root, per_class=10, with_json=False)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    s = _load(tiny_card(), root, cache)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # data root untouched
    assert len(list((cache / "data" / "splits").glob("tiny-*.json"))) == 1
    assert [len(s.train), len(s.val), len(s.test)] == [15, 6, 9]  # per class 5 / 2 / 3
    assert np.bincount(s.train.labels).tolist() == [5, 5, 5]
    assert s.classnames == CLASSES
    every = set(s.train.paths) | set(s.val.paths) | set(s.test.paths)
    assert len(every) == 30
    again = _load(tiny_card(), root, cache)
    assert again.train.paths == s.train.paths and again.fingerprint == s.fingerprint
    other = _load(tiny_card(), root, cache, seed=1)
    assert other.train.paths != s.train.paths
    assert len(list((cache / "data" / "splits").glob("tiny-*.json"))) == 2


def test_a_stored_split_is_read_back_as_written(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    coop_folder(root, per_class=10, with_json=False)
    first = _load(tiny_card(), root, cache)
    (stored,) = (cache / "data" / "splits").glob("tiny-*.json")
    raw = json.loads(stored.read_text())
    raw["train"], raw["test"] = raw["test"], raw["train"]
    stored.write_text(json.dumps(raw))
    assert _load(tiny_card(), root, cache).test.paths == first.train.paths


def test_fallback_honours_ignored_folders_and_renames(tmp_path):
    root = tmp_path / "data"
    coop_folder(root, classes=("cat", "dog", "fox", "BACKGROUND"), with_json=False)
    card = tiny_card(ignored=["BACKGROUND"], renames={"fox": "red fox"})
    s = _load(card, root, tmp_path / "cache")
    assert s.classnames == ("cat", "dog", "red fox")
    assert not any(p.startswith("BACKGROUND") for p in s.train.paths + s.test.paths)


def test_fallback_with_too_few_images_names_the_class(tmp_path):
    root = tmp_path / "data"
    coop_folder(root, per_class=2, with_json=False)
    with pytest.raises(UsageError, match=r"too_few_images: tiny/images/cat: 2 images"):
        _load(tiny_card(), root, tmp_path / "cache")
    assert not (tmp_path / "cache" / "data" / "splits").exists()  # nothing stored


def test_no_json_and_no_fallback_says_which_file_to_get(tmp_path):
    coop_folder(tmp_path / "data", with_json=False)
    with pytest.raises(UsageError, match=r"no split file tiny/split_zhou_Tiny\.json") as err:
        _load(tiny_card(fallback="none"), tmp_path / "data", tmp_path / "cache")
    assert "fpl-bench data check" in str(err.value) and "\n" not in str(err.value)


def test_missing_dataset_folder_and_missing_root(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(UsageError, match=r"no folder tiny/ under"):
        _load(tiny_card(), tmp_path / "data", tmp_path / "cache")
    with pytest.raises(UsageError, match="pass --data-root"):
        load_source(tiny_card(), root=None, options={}, cache_dir=tmp_path)
    with pytest.raises(UsageError, match="no such folder"):
        _load(tiny_card(), tmp_path / "nowhere", tmp_path / "cache")


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("../x.jpg", "'..' in path refused"),
        ("cat/../../x.jpg", "'..' in path refused"),
        ("/etc/passwd", "absolute path refused"),
    ],
)
def test_split_paths_that_escape_are_refused(tmp_path, path, needle):
    root = tmp_path / "data"
    split = coop_folder(root)
    write_image(root / "tiny" / "x.jpg")  # the target exists: refused all the same
    split["train"].append([path, 0, "cat"])
    write_split(root, split)
    with pytest.raises(UsageError, match="path_escape") as err:
        _load(tiny_card(), root, tmp_path / "cache")
    assert needle in str(err.value)


def test_a_symlink_pointing_out_of_the_image_folder_is_refused(tmp_path):
    root = tmp_path / "data"
    split = coop_folder(root)
    write_image(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", root / "tiny" / "images" / "cat" / "link.png")
    split["train"].append(["cat/link.png", 0, "cat"])
    write_split(root, split)
    with pytest.raises(UsageError, match=r"path_escape: tiny/images/cat/link\.png"):
        _load(tiny_card(), root, tmp_path / "cache")


def test_a_symlinked_dataset_folder_is_fine(tmp_path):
    """CoOp's DATASETS.md suggests linking a copy kept elsewhere: the link target is the base."""
    coop_folder(tmp_path / "elsewhere")
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "elsewhere" / "tiny", tmp_path / "data" / "tiny")
    s = _load(tiny_card(), tmp_path / "data", tmp_path / "cache")
    assert len(s.train) == 6


def test_missing_image_bad_label_and_name_mismatch_are_usage_errors(tmp_path):
    root = tmp_path / "data"
    split = coop_folder(root)
    (root / "tiny" / "images" / "fox" / "fox_3.png").unlink()
    with pytest.raises(UsageError, match=r"missing_image: tiny/images/fox/fox_3\.png \[test\]"):
        _load(tiny_card(), root, tmp_path / "cache")
    split = coop_folder(root)
    split["val"][0][1] = 9
    write_split(root, split)
    with pytest.raises(UsageError, match=r"bad_label: .*label 9 outside \[0, 3\)"):
        _load(tiny_card(), root, tmp_path / "cache")
    split = coop_folder(root)
    split["test"][0][2] = "kitten"
    write_split(root, split)
    with pytest.raises(UsageError, match="classname_mismatch"):
        _load(tiny_card(), root, tmp_path / "cache")


def test_malformed_json_is_one_line(tmp_path):
    root = tmp_path / "data"
    coop_folder(root)
    (root / "tiny" / "split_zhou_Tiny.json").write_text("{not json")
    with pytest.raises(UsageError, match="cannot read JSON"):
        _load(tiny_card(), root, tmp_path / "cache")
    (root / "tiny" / "split_zhou_Tiny.json").write_text(json.dumps({"train": [["a", "b"]]}))
    with pytest.raises(UsageError, match="bad_entry"):
        _load(tiny_card(), root, tmp_path / "cache")


def test_stanford_cars_paths_start_at_the_dataset_folder(tmp_path):
    card = dataset_card("stanford_cars")
    cars = tmp_path / "stanford_cars"
    split = {"train": [], "val": [], "test": []}
    for label in range(196):
        for part, folder in (("train", "cars_train"), ("val", "cars_train"), ("test", "cars_test")):
            rel = f"{folder}/{part}_{label:03d}.jpg"
            write_image(cars / rel, size=(6, 4))
            split[part].append([rel, label, f"car {label}"])
    (cars / "split_zhou_StanfordCars.json").write_text(json.dumps(split))
    s = load_source(card, root=tmp_path, options={}, cache_dir=tmp_path / "cache")
    assert len(s.classnames) == 196 and s.test.paths[0] == "cars_test/test_000.jpg"
    assert s.train.root == cars.resolve()
