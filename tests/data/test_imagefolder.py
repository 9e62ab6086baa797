"""The generic class-per-folder source: names from folders or a names file, a seeded split kept
in the cache dir and read back, one-line problems, and `data check` on a named tree."""

import json
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from fpl_bench.data.catalog import dataset_card, parse_card
from fpl_bench.data.check import check_data_root
from fpl_bench.data.sources import load_source
from fpl_bench.errors import UsageError

CARDS = Path(__file__).resolve().parents[2] / "datasets"
FOLDERS = ("golden_retriever", "tabby_cat", "red_fox")


def image_tree(root: Path, *, per_class: int = 5, folders=FOLDERS) -> Path:
    """ROOT/<folder>/<i>.png|jpg: small solid images, made here with PIL."""
    for c, folder in enumerate(folders):
        for i in range(per_class):
            path = root / folder / f"{i}.{'png' if i % 2 else 'jpg'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (14, 10 + i), (60 * c, 30 * i, 90)).save(path)
    return root


def test_class_names_come_from_the_sorted_folders_with_spaces(tmp_path):
    root = image_tree(tmp_path / "tree")
    (root / ".hidden").mkdir()
    (root / "notes.txt").write_text("not a class")
    splits = load_source(
        dataset_card("imagefolder"), root=root, options={}, cache_dir=tmp_path / "c"
    )
    assert splits.classnames == ("golden retriever", "red fox", "tabby cat")
    # 5 images a class at p_train 0.5, p_val 0.2: round(2.5) = 2 train, 1 val, 2 test
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 6)
    every = [p for s in (splits.train, splits.val, splits.test) for p in s.paths]
    assert len(set(every)) == 15 and all(p.split("/")[0] in FOLDERS for p in every)


def test_the_split_is_kept_in_the_cache_dir_and_read_back(tmp_path):
    root, cache = image_tree(tmp_path / "tree"), tmp_path / "cache"
    card = dataset_card("imagefolder")
    first = load_source(card, root=root, options={"seed": 3}, cache_dir=cache)
    (stored,) = (cache / "data" / "splits").glob("imagefolder-*.json")
    raw = json.loads(stored.read_text())
    assert [e[0] for e in raw["train"]] == list(first.train.paths)
    # a rerun reads the stored split, even where a new draw would differ
    raw["train"], raw["test"] = raw["test"], raw["train"]
    stored.write_text(json.dumps(raw))
    again = load_source(card, root=root, options={"seed": 3}, cache_dir=cache)
    assert again.train.paths == first.test.paths
    other = load_source(card, root=root, options={"seed": 4}, cache_dir=cache)
    assert other.train.paths != first.train.paths  # another seed, another split file
    assert len(list((cache / "data" / "splits").glob("imagefolder-*.json"))) == 2


def test_a_names_file_names_the_classes(tmp_path):
    root = image_tree(tmp_path / "tree")
    lines = "golden_retriever Golden Retriever\ntabby_cat tabby\n\nred_fox fox, red\n"
    (root / "names.txt").write_text(lines)
    card = dataset_card("imagefolder")
    options = {"names_file": "names.txt"}
    splits = load_source(card, root=root, options=options, cache_dir=tmp_path / "c")
    assert splits.classnames == ("Golden Retriever", "fox, red", "tabby")


@pytest.mark.parametrize(
    ("names", "options", "needle"),
    [
        ("golden_retriever dog\nred_fox fox\n", {}, "no line for the class folder(s) tabby_cat"),
        ("golden_retriever a\nred_fox a\ntabby_cat b\n", {}, "both give the class name 'a'"),
        (None, {"names_file": "absent.txt"}, "no names file absent.txt"),
        (None, {"names_file": "../names.txt"}, "'..' in path refused"),
        (None, {"p_train": 0.9, "p_val": 0.2}, "p_train + p_val < 1"),
        (None, {"colour": "red"}, "has no option 'colour'"),
    ],
)
def test_bad_names_or_options_are_one_line(tmp_path, names, options, needle):
    root = image_tree(tmp_path / "tree")
    if names is not None:
        (root / "names.txt").write_text(names)
        options = {"names_file": "names.txt", **options}
    with pytest.raises(UsageError) as err:
        load_source(dataset_card("imagefolder"), root=root, options=options, cache_dir=tmp_path)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_an_empty_tree_or_a_tiny_class_is_one_line(tmp_path):
    card = dataset_card("imagefolder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"missing: \.: no class folders"):
        load_source(card, root=tmp_path / "empty", options={}, cache_dir=tmp_path)
    root = image_tree(tmp_path / "tree")
    image_tree(root, per_class=2, folders=("wolf",))
    with pytest.raises(UsageError, match=r"too_few_images: wolf: 2 images"):
        load_source(card, root=root, options={}, cache_dir=tmp_path)


def test_a_card_of_ones_own_may_fix_the_class_count_and_a_sub_folder(tmp_path):
    data = tomllib.loads((CARDS / "imagefolder.toml").read_text())
    data.update(name="pets", classes=3)
    data["source"] = {"kind": "imagefolder", "image_dir": "pets/images", "ignored": ["extra"]}
    card = parse_card(data, where="pets.toml")
    image_tree(tmp_path / "pets" / "images")
    image_tree(tmp_path / "pets" / "images", folders=("extra",))
    splits = load_source(card, root=tmp_path, options={}, cache_dir=tmp_path / "c")
    assert len(splits.classnames) == 3 and "extra" not in splits.classnames
    four = card.model_copy(update={"classes": 4})
    with pytest.raises(UsageError, match="3 class folders, but the card says 4 classes"):
        load_source(four, root=tmp_path, options={}, cache_dir=tmp_path / "c")
    coop = tomllib.loads((CARDS / "dtd.toml").read_text())
    del coop["classes"]  # only an imagefolder card may leave the count out
    with pytest.raises(UsageError, match="classes is required for a coop source"):
        parse_card(coop, where="dtd.toml")


def test_data_check_reads_the_tree_only_when_named(tmp_path):
    root = image_tree(tmp_path / "tree")
    (report,) = check_data_root(root, ["imagefolder"])
    assert report.status == "found" and report.counts == {"train": 6, "val": 3, "test": 6}
    assert not list(tmp_path.glob("**/splits"))  # data check writes nothing
    assert "imagefolder" not in {r.name for r in check_data_root(root)}
