"""FGVC-Aircraft (variants.txt + images_variant_*.txt) and ImageNet (class folders +
classnames.txt) as CoOp lays them out: loading, data check, refused paths, one run of each."""

import os
import pickle
import tomllib

import numpy as np
import pandas as pd
import pytest

from fpl_bench.data import catalog
from fpl_bench.data.catalog import dataset_card
from fpl_bench.data.check import check_dataset
from fpl_bench.data.sources import load_source
from fpl_bench.errors import UsageError
from tests.cli import run_main
from tests.data.helpers import (
    VARIANTS,
    WNIDS,
    aircraft_card,
    aircraft_folder,
    imagenet_card,
    imagenet_folder,
    write_aircraft_list,
    write_image,
)


def _load(card, root, **options):
    return load_source(card, root=root, options=options, cache_dir=root.parent / "cache")


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*"))


# -- FGVC-Aircraft ----------------------------------------------------------------------------


def test_aircraft_lists_are_the_split_and_variants_txt_the_labels(tmp_path):
    root = tmp_path / "data"
    lines = aircraft_folder(root)
    before = _files(root)
    s = _load(aircraft_card(), root)
    assert s.classnames == VARIANTS and s.domain_names == ("planes",)
    assert (len(s.train), len(s.val), len(s.test)) == (9, 3, 6)  # 3 variants x (3, 1, 2)
    for split in ("train", "val", "test"):
        part = getattr(s, split)
        assert part.file_backed and part.root == (root / "planes" / "images").resolve()
        assert list(part.paths) == [f"{image_id}.jpg" for image_id, _ in lines[split]]
        assert part.labels.tolist() == [VARIANTS.index(v) for _, v in lines[split]]
    assert s.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert _files(root) == before  # nothing written into the data root
    assert _load(aircraft_card(), root).fingerprint == s.fingerprint


def test_aircraft_takes_no_option(tmp_path):
    aircraft_folder(tmp_path / "data")
    with pytest.raises(UsageError, match="has no option 'seed'; options: none"):
        _load(aircraft_card(), tmp_path / "data", seed=1)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (
            lambda root, lines: (root / "planes/images/01va0.jpg").unlink(),
            r"missing_image: planes/images/01va0\.jpg \[val\]: no such file",
        ),
        (
            lambda root, lines: write_aircraft_list(root, "test", [*lines["test"], ("7", "A380")]),
            r"bad_label: planes/images/7\.jpg \[test\]: line 7 of "
            r"planes/images_variant_test\.txt: variant 'A380' is not in planes/variants\.txt",
        ),
        (
            lambda root, lines: write_aircraft_list(root, "train", [*lines["train"], ("0", "")]),
            r"bad_entry: planes/images_variant_train\.txt: line 10: '0' is not "
            r"'<image id> <variant>'",
        ),
        (
            lambda root, lines: (root / "planes/variants.txt").write_text("707-320\n707-320\n"),
            r"classname_mismatch: planes/variants\.txt: '707-320' is listed twice",
        ),
        (
            lambda root, lines: (root / "planes/images_variant_val.txt").unlink(),
            r"missing: planes/images_variant_val\.txt: no file",
        ),
    ],
)
def test_aircraft_problems_are_one_line_each(tmp_path, change, needle):
    root = tmp_path / "data"
    change(root, aircraft_folder(root))
    with pytest.raises(UsageError, match=needle) as err:
        _load(aircraft_card(), root)
    message = str(err.value)
    assert "\n" not in message and "fpl-bench data check --data-root" in message


@pytest.mark.parametrize(
    ("image_id", "needle"),
    [("../outside", "'..' in path refused"), ("/etc/passwd", "absolute path refused")],
)
def test_aircraft_image_ids_that_escape_are_refused(tmp_path, image_id, needle):
    root = tmp_path / "data"
    lines = aircraft_folder(root)
    write_image(root / "planes" / "outside.jpg")  # the target exists: refused all the same
    write_aircraft_list(root, "train", [*lines["train"], (image_id, "707-320")])
    with pytest.raises(UsageError, match="path_escape") as err:
        _load(aircraft_card(), root)
    assert needle in str(err.value)


def test_aircraft_missing_folder_says_where_to_get_it(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(UsageError, match=r"missing: planes: no folder planes/ under .*; download"):
        _load(aircraft_card(), tmp_path / "data")
    report = check_dataset(dataset_card("fgvc_aircraft"), tmp_path / "data")
    assert report.status == "missing"
    assert report.todo[0].startswith("get it from https://www.robots.ox.ac.uk/~vgg/data/fgvc")
    assert "images_variant_train.txt" in report.layout


def test_aircraft_check_reports_each_problem_with_its_path(tmp_path):
    root = tmp_path / "data"
    lines = aircraft_folder(root)
    images = root / "planes" / "images"
    (images / "00tr1.jpg").unlink()  # missing (train)
    (images / "02te1.jpg").write_bytes(b"not a jpeg")  # unreadable (test)
    write_image(tmp_path / "outside.jpg")
    os.symlink(tmp_path / "outside.jpg", images / "link.jpg")
    extra = [("link", "Cessna 172"), ("../../x", "707-320"), ("9", "Spitfire")]
    write_aircraft_list(root, "val", lines["val"] + extra)
    report = check_dataset(aircraft_card(), root)
    assert report.status == "malformed"
    found = {(p.kind, p.where, p.split) for p in report.problems}
    assert found == {
        ("bad_label", "planes/images/9.jpg", "val"),
        ("missing_image", "planes/images/00tr1.jpg", "train"),
        ("path_escape", "planes/images/link.jpg", "val"),
        ("path_escape", "planes/images/../../x.jpg", "val"),
        ("unreadable", "planes/images/02te1.jpg", "test"),
    }
    assert report.counts == {"train": 8, "val": 3, "test": 5}  # usable images only
    text = "\n".join(report.lines())
    assert "symlink pointing out is refused" in text and "to do: bad_label:" in text


def test_shipped_aircraft_card_is_found_by_data_check(tmp_path):
    card = dataset_card("fgvc_aircraft")
    folder = tmp_path / "fgvc_aircraft"
    variants = [f"Variant {i:03d}" for i in range(100)]
    (folder / "images").mkdir(parents=True)
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    for split in ("train", "val", "test"):
        ids = [f"{split[:2]}{i:05d}" for i in range(100)]
        for image_id in ids:
            write_image(folder / "images" / f"{image_id}.jpg", size=(4, 3))
        text = "".join(f"{i} {v}\n" for i, v in zip(ids, variants, strict=True))
        (folder / f"images_variant_{split}.txt").write_text(text)
    report = check_dataset(card, tmp_path)
    assert report.status == "found", report.lines()
    assert report.counts == {"train": 100, "val": 100, "test": 100}
    s = load_source(card, root=tmp_path, options={}, cache_dir=tmp_path / "c")
    assert s.classnames[0] == "Variant 000" and s.test.paths[-1] == "te00099.jpg"


# -- ImageNet ---------------------------------------------------------------------------------


def test_imagenet_labels_follow_the_sorted_train_folders(tmp_path):
    root = tmp_path / "data"
    imagenet_folder(root)
    before = _files(root)
    s = _load(imagenet_card(), root)
    assert s.classnames == ("tench", "goldfish", "great white shark")  # sorted wnids' names
    # per class: 8 train images -> round(8 * 0.25) = 2 held out as val; val/ -> 2 test
    assert (len(s.train), len(s.val), len(s.test)) == (18, 6, 6)
    assert np.bincount(s.val.labels).tolist() == [2, 2, 2]
    images = root / "inet" / "images"
    assert s.train.root == s.val.root == (images / "train").resolve()
    assert s.test.root == (images / "val").resolve()
    assert not set(s.train.paths) & set(s.val.paths)
    assert len(set(s.train.paths) | set(s.val.paths)) == 24
    wnids = sorted(WNIDS)
    for part in (s.train, s.val, s.test):
        for path, label in zip(part.paths, part.labels, strict=True):
            assert path.split("/")[0] == wnids[label]
    assert s.test.paths[0] == "n01440764/ILSVRC2012_val_00.JPEG"
    assert _files(root) == before


def test_imagenet_holdout_is_seeded(tmp_path):
    root = tmp_path / "data"
    imagenet_folder(root)
    first = _load(imagenet_card(), root)
    assert _load(imagenet_card(), root).val.paths == first.val.paths
    other = _load(imagenet_card(), root, seed=3)
    assert other.val.paths != first.val.paths and other.fingerprint != first.fingerprint
    assert len(_load(imagenet_card(), root, val_fraction=0.0).val) == 0
    with pytest.raises(UsageError, match=r"val_fraction=1\.5 must lie in \[0, 1\)"):
        _load(imagenet_card(), root, val_fraction=1.5)


def test_imagenet_never_reads_coops_pickle(tmp_path, monkeypatch):
    root = tmp_path / "data"
    imagenet_folder(root)
    (root / "inet" / "preprocessed.pkl").write_bytes(pickle.dumps({"train": [], "test": []}))

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was read")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    assert len(_load(imagenet_card(), root).test) == 6


def test_imagenet_symlinked_split_folders_are_fine(tmp_path):
    """CoOp's DATASETS.md suggests linking train/ and val/ to a copy kept elsewhere."""
    imagenet_folder(tmp_path / "elsewhere")
    images = tmp_path / "data" / "inet" / "images"
    images.mkdir(parents=True)
    for part in ("train", "val"):
        os.symlink(tmp_path / "elsewhere" / "inet" / "images" / part, images / part)
    os.symlink(tmp_path / "elsewhere" / "inet" / "classnames.txt", images.parent / "classnames.txt")
    s = _load(imagenet_card(), tmp_path / "data")
    assert (len(s.train), len(s.test)) == (18, 6)
    assert check_dataset(imagenet_card(), tmp_path / "data").status == "found"


def _rename(root, old, new):
    (root / "inet" / "images" / old).rename(root / "inet" / "images" / new)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (
            lambda root: _rename(root, "train/n01484850", "train/n09999999"),
            r"classname_mismatch: inet/images/train/n09999999: no line for this class folder",
        ),
        (
            lambda root: _rename(root, "val/n01484850", "val/n01484851"),
            r"classname_mismatch: inet/images/val/n01484851: no class folder n01484851/ in "
            r"inet/images/train/",
        ),
        (
            lambda root: (root / "inet" / "classnames.txt").unlink(),
            r"missing: inet/classnames\.txt: no file inet/classnames\.txt",
        ),
        (
            lambda root: (root / "inet" / "classnames.txt").write_text("n01440764\n"),
            r"bad_entry: inet/classnames\.txt: line 1: 'n01440764' is not '<wnid> <class name>'",
        ),
    ],
)
def test_imagenet_problems_are_one_line_each(tmp_path, change, needle):
    root = tmp_path / "data"
    imagenet_folder(root)
    change(root)
    with pytest.raises(UsageError, match=needle) as err:
        _load(imagenet_card(), root)
    assert "\n" not in str(err.value) and "fpl-bench data check" in str(err.value)


def test_imagenet_flat_val_folder_says_to_sort_it(tmp_path):
    root = tmp_path / "data"
    imagenet_folder(root, wnids={"n01440764": "tench"})
    val = root / "inet" / "images" / "val"
    for image in (val / "n01440764").iterdir():
        image.rename(val / image.name)
    (val / "n01440764").rmdir()
    with pytest.raises(UsageError, match=r"missing: inet/images/val: .*sort the official val"):
        _load(imagenet_card(), root)


def test_imagenet_check_reports_each_problem_with_its_path(tmp_path):
    root = tmp_path / "data"
    imagenet_folder(root)
    train = root / "inet" / "images" / "train"
    write_image(tmp_path / "outside.jpg")
    os.symlink(tmp_path / "outside.jpg", train / "n01443537" / "link.JPEG")
    (root / "inet" / "images" / "val" / "n01484850" / "ILSVRC2012_val_21.JPEG").write_bytes(b"x")
    report = check_dataset(imagenet_card(), root)
    assert report.status == "malformed"
    found = {(p.kind, p.where) for p in report.problems}
    assert found == {
        ("path_escape", "inet/images/train/n01443537/link.JPEG"),
        ("unreadable", "inet/images/val/n01484850/ILSVRC2012_val_21.JPEG"),
    }
    assert sum(report.counts.values()) == 8 * 3 + 1 + 6 - 2  # link.JPEG is listed


def test_imagenet_missing_folder_says_where_to_get_it(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(UsageError, match=r"missing: inet: no folder inet/ under"):
        _load(imagenet_card(), tmp_path / "data")
    report = check_dataset(dataset_card("imagenet"), tmp_path / "data")
    assert report.status == "missing" and "https://image-net.org/" in report.todo[0]
    assert "classnames.txt" in report.todo[0] and "images/val/" in report.layout


def test_shipped_imagenet_card_loads_1000_classes(tmp_path):
    card = dataset_card("imagenet")
    folder = tmp_path / "imagenet"
    wnids = [f"n{i:08d}" for i in range(1000)]
    for wnid in wnids:
        write_image(folder / "images" / "train" / wnid / f"{wnid}_1.JPEG", size=(4, 3))
        write_image(folder / "images" / "val" / wnid / f"v_{wnid}.JPEG", size=(4, 3))
    (folder / "classnames.txt").write_text("".join(f"{w} class {w[-3:]}\n" for w in wnids))
    s = load_source(card, root=tmp_path, options={}, cache_dir=tmp_path / "c")
    assert len(s.classnames) == 1000 and s.classnames[7] == "class 007"
    assert (len(s.train), len(s.val), len(s.test)) == (1000, 0, 1000)  # round(1 * 0.04) = 0


# -- one federated round on each, through the CLI -------------------------------------------------


@pytest.fixture
def three_class_cards(tmp_path, monkeypatch):
    """The shipped fgvc_aircraft and imagenet cards with ``classes = 3`` (a smaller run)."""
    folder = tmp_path / "cards"
    folder.mkdir()
    for name in ("fgvc_aircraft", "imagenet"):
        text = (catalog.cards_dir() / f"{name}.toml").read_text()
        classes = tomllib.loads(text)["classes"]
        (folder / f"{name}.toml").write_text(text.replace(f"classes = {classes}", "classes = 3"))
    monkeypatch.setattr(catalog, "cards_dir", lambda: folder)
    catalog.dataset_cards.cache_clear()
    yield
    catalog.dataset_cards.cache_clear()


def _shipped_layout(root, dataset):
    """The tiny folders of the helpers, renamed to the shipped cards' folders."""
    if dataset == "fgvc_aircraft":
        aircraft_folder(root, counts=(4, 1, 2))
        (root / "planes").rename(root / "fgvc_aircraft")
    else:
        imagenet_folder(root, n_train=5, n_val=2)
        (root / "inet").rename(root / "imagenet")


@pytest.mark.parametrize("dataset", ["fgvc_aircraft", "imagenet"])
def test_one_round_runs_end_to_end(tmp_path, monkeypatch, three_class_cards, dataset):
    root, out = tmp_path / "data", tmp_path / "out"
    _shipped_layout(root, dataset)
    args = ["fpl-bench", "run", "--methods", "coop", "--dataset", dataset, "--data-root", str(root)]
    args += ["--protocol", "personalized", "--clients", "2", "--shots", "1", "--rounds", "1"]
    args += ["--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert run_main(args[1:], monkeypatch) == 0
    frame = pd.read_csv(out / "results.csv")
    assert list(frame.status) == ["finished"] and list(frame.dataset) == [dataset]
    assert 0.0 <= frame.local_acc.iloc[0] <= 1.0
