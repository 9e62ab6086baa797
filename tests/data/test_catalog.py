"""Dataset cards: every shipped card validates; a bad card is one line naming file and field."""

import tomllib
from pathlib import Path

import pytest

from fpl_bench import cards
from fpl_bench.data import catalog
from fpl_bench.data.catalog import DatasetCard, dataset_card, dataset_cards, load_card, parse_card
from fpl_bench.errors import UsageError

DATASETS = Path(__file__).resolve().parents[2] / "datasets"
GOOD = tomllib.loads((DATASETS / "dtd.toml").read_text())


def test_every_shipped_card_validates_and_is_keyed_by_its_stem():
    found = dataset_cards()
    assert sorted(found) == sorted(p.stem for p in DATASETS.glob("*.toml"))
    expected = {
        "synthetic": "synthetic",
        "caltech101": "coop",
        "oxford_pets": "coop",
        "oxford_flowers": "coop",
        "food101": "coop",
        "dtd": "coop",
        "eurosat": "coop",
        "stanford_cars": "coop",
        "sun397": "coop",
        "ucf101": "coop",
        "fgvc_aircraft": "aircraft",
        "imagenet": "imagenet",
        "cifar10": "cifar",
        "cifar100": "cifar",
        "office_caltech10": "domains",
        "domainnet": "domains",
        "pacs": "domains",
        "imagefolder": "imagefolder",
    }
    for name, kind in expected.items():
        assert found[name].kind == kind
    assert found["domainnet"].source.classnames == (
        "bird",
        "feather",
        "headphones",
        "ice_cream",
        "teapot",
        "tiger",
        "whale",
        "windmill",
        "wine_glass",
        "zebra",
    )


def test_the_cards_module_reexports_the_catalog():
    assert cards.DatasetCard is DatasetCard
    assert cards.dataset_card("dtd") is dataset_card("dtd")


def test_each_card_says_how_to_get_it():
    for card in dataset_cards().values():
        counted = card.classes is None and card.kind == "imagefolder"  # its folders say it
        assert (counted or card.classes >= 1) and card.layout.strip()
        assert card.url and card.citation


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(UsageError, match=r"unknown dataset 'imagenet-xl'; known: .*dtd"):
        dataset_card("imagenet-xl")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda d: d.pop("citation"), "citation: Field required"),
        (lambda d: d.update(licence="CC"), "licence: Extra inputs are not permitted"),
        (lambda d: d["source"].pop("split_file"), "source.coop.split_file: Field required"),
        (lambda d: d["source"].update(folder="x"), "source.coop.folder: Extra inputs"),
        (lambda d: d["source"].update(kind="lmdb"), "does not match any of the expected tags"),
        (lambda d: d["source"].update(image_dir="../images"), "without '..'"),
        (lambda d: d.update(classes=0), "classes: Input should be greater than or equal to 1"),
        (lambda d: d.update(partition="shards"), "partition: Input should be"),
        (lambda d: d.update(partition="by_domain"), "needs a domain source"),
    ],
)
def test_a_bad_card_is_one_line_naming_the_field(change, needle):
    data = {**GOOD, "source": dict(GOOD["source"])}
    change(data)
    with pytest.raises(UsageError) as err:
        parse_card(data, where="datasets/dtd.toml")
    message = str(err.value)
    assert "\n" not in message and message.startswith("bad card datasets/dtd.toml: ")
    assert needle in message, message


@pytest.mark.parametrize(
    ("card", "change", "needle"),
    [
        (
            "fgvc_aircraft",
            {"train_list": "../lists.txt"},
            "source.aircraft.train_list: Value error",
        ),
        ("fgvc_aircraft", {"image_suffix": "jpg"}, "source.aircraft.image_suffix: String should"),
        ("imagenet", {"test_dir": "/data/val"}, "source.imagenet.test_dir: Value error"),
        ("imagenet", {"val_dir": "val"}, "source.imagenet.val_dir: Extra inputs"),
    ],
)
def test_aircraft_and_imagenet_sources_are_checked(card, change, needle):
    data = tomllib.loads((DATASETS / f"{card}.toml").read_text())
    data["source"].update(change)
    with pytest.raises(UsageError, match=needle):
        parse_card(data, where=f"{card}.toml")


def test_domain_card_class_count_must_match_its_class_folders():
    data = tomllib.loads((DATASETS / "pacs.toml").read_text())
    data["classes"] = 8
    with pytest.raises(UsageError, match=r"classes=8 but source\.classnames lists 7"):
        parse_card(data, where="pacs.toml")


def test_card_name_must_equal_the_file_stem(tmp_path):
    path = tmp_path / "textures.toml"
    path.write_text((DATASETS / "dtd.toml").read_text())
    with pytest.raises(UsageError, match="name 'dtd' differs from the file stem"):
        load_card(path)


def test_broken_toml_is_a_usage_error(tmp_path, monkeypatch):
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "bad.toml").write_text("name = \n")
    monkeypatch.setattr(catalog, "cards_dir", lambda: tmp_path / "datasets")
    catalog.dataset_cards.cache_clear()
    try:
        with pytest.raises(UsageError, match=r"bad card .*bad\.toml"):
            catalog.dataset_cards()
    finally:
        catalog.dataset_cards.cache_clear()
