"""``data check``: found / missing / malformed per dataset, each problem with its path."""

import json
import os
import pickle

import pytest

from fpl_bench.data.catalog import dataset_card
from fpl_bench.data.check import check_data_root, check_dataset, exit_code
from tests.cli import run_cli
from tests.data.helpers import (
    coop_folder,
    domain_card,
    domain_folder,
    tiny_card,
    write_cifar10,
    write_image,
    write_split,
)


def tamper(root, tmp_path):
    """A tiny CoOp folder with one of each problem; returns the offending display paths."""
    split = coop_folder(root)
    (root / "tiny" / "images" / "dog" / "dog_0.jpg").unlink()  # missing image (train)
    write_image(root / "tiny" / "x.jpg")
    split["train"].append(["../x.jpg", 0, "cat"])  # escapes the image folder
    split["train"].append([str(tmp_path / "abs.png"), 0, "cat"])  # absolute
    split["val"][1][1] = 7  # bad label: dog_2.png
    write_image(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", root / "tiny" / "images" / "cat" / "link.png")
    split["test"].append(["cat/link.png", 0, "cat"])  # symlink pointing out
    (root / "tiny" / "images" / "fox" / "fox_3.png").write_bytes(b"not a png")  # unreadable
    write_split(root, split)
    return {
        "missing_image": "tiny/images/dog/dog_0.jpg",
        "path_escape": "tiny/images/../x.jpg",
        "bad_label": "tiny/images/dog/dog_2.jpg",
        "unreadable": "tiny/images/fox/fox_3.png",
    }


def test_a_clean_folder_is_found_with_counts(tmp_path):
    coop_folder(tmp_path)
    report = check_dataset(tiny_card(), tmp_path)
    assert report.status == "found" and not report.problems and not report.todo
    assert report.counts == {"train": 6, "val": 3, "test": 3}
    assert report.note == "tiny/split_zhou_Tiny.json"


def test_a_tampered_folder_reports_each_problem_with_its_path(tmp_path):
    paths = tamper(tmp_path, tmp_path)
    report = check_dataset(tiny_card(), tmp_path)
    assert report.status == "malformed"
    by_kind = {}
    for p in report.problems:
        by_kind.setdefault(p.kind, []).append(p)
    assert set(by_kind) == {"missing_image", "path_escape", "bad_label", "unreadable"}
    assert [p.where for p in by_kind["missing_image"]] == [paths["missing_image"]]
    assert by_kind["missing_image"][0].split == "train"
    escapes = {p.where: p.detail for p in by_kind["path_escape"]}
    assert "'..' in path refused" in escapes["tiny/images/../x.jpg"]
    assert any("absolute path refused" in d for d in escapes.values())
    assert "symlink pointing out is refused" in escapes["tiny/images/cat/link.png"]
    assert by_kind["bad_label"][0].where == paths["bad_label"]
    assert "label 7 outside [0, 3)" in by_kind["bad_label"][0].detail
    assert by_kind["unreadable"][0].where == paths["unreadable"]
    assert report.counts == {"train": 5, "val": 2, "test": 2}  # usable images only
    assert {line.split(":")[0] for line in report.todo} == set(by_kind)
    text = "\n".join(report.lines())
    assert "Traceback" not in text and "malformed" in text and paths["unreadable"] in text


def test_class_name_mismatch_is_reported(tmp_path):
    split = coop_folder(tmp_path)
    split["test"][2][2] = "wolf"
    write_split(tmp_path, split)
    report = check_dataset(tiny_card(), tmp_path)
    assert report.status == "malformed"
    assert [p.kind for p in report.problems] == ["classname_mismatch"]
    assert "'wolf' here but 'fox' elsewhere" in report.problems[0].detail


def test_a_missing_dataset_says_where_to_get_it(tmp_path):
    report = check_dataset(tiny_card(), tmp_path)
    assert report.status == "missing" and report.counts == {}
    assert "https://example.org/tiny" in report.todo[0]
    assert report.layout.startswith("tiny/")
    assert "  images/<class>/*.png" in "\n".join(report.lines())


def test_check_of_a_fallback_split_writes_nothing(tmp_path):
    coop_folder(tmp_path / "data", per_class=5, with_json=False)
    before = sorted(tmp_path.rglob("*"))
    report = check_dataset(tiny_card(), tmp_path / "data")
    assert report.status == "found" and "seeded class-folder split" in report.note
    assert report.counts == {"train": 6, "val": 3, "test": 6}
    assert sorted(tmp_path.rglob("*")) == before


def test_cifar_and_domain_and_synthetic_checks(tmp_path):
    folder = write_cifar10(tmp_path)
    report = check_dataset(dataset_card("cifar10"), tmp_path)
    assert report.status == "found" and report.counts == {"train": 50, "test": 10}
    (folder / "test_batch").write_bytes(pickle.dumps({"x": os.getcwd}, protocol=2))
    bad = check_dataset(dataset_card("cifar10"), tmp_path)
    assert bad.status == "malformed" and bad.problems[0].where == "cifar-10-batches-py/test_batch"
    assert "is not allowed" in bad.problems[0].detail
    domain_folder(tmp_path)
    assert check_dataset(domain_card(), tmp_path).status == "found"
    assert check_dataset(dataset_card("pacs"), tmp_path).status == "missing"
    assert check_dataset(dataset_card("synthetic"), tmp_path).status == "generated"


def test_exit_code_rules(tmp_path):
    coop_folder(tmp_path)
    found = check_dataset(tiny_card(), tmp_path)
    missing = check_dataset(dataset_card("dtd"), tmp_path)
    assert exit_code([found, missing], named=False) == 0
    assert exit_code([found, missing], named=True) == 2
    assert exit_code([missing], named=False) == 2  # nothing found: probably the wrong root
    tamper(tmp_path, tmp_path)
    assert exit_code([check_dataset(tiny_card(), tmp_path), missing], named=False) == 2


# -- the CLI ----------------------------------------------------------------------------------


def eurosat(root):
    """The shipped eurosat card's layout: 10 class folders of 4 images and its split JSON."""
    card = dataset_card("eurosat")
    split = {"train": [], "val": [], "test": []}
    for label, (folder, name) in enumerate(sorted(card.source.renames.items())):
        for i in range(4):
            rel = f"{folder}/{folder}_{i}.jpg"
            write_image(root / "eurosat" / "2750" / rel, size=(16, 16), value=label * 9 + i)
            split["train" if i < 2 else "val" if i == 2 else "test"].append([rel, label, name])
    (root / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    return split


def test_cli_check_found_exits_0(tmp_path, capsys, monkeypatch):
    eurosat(tmp_path)
    code, out, _ = run_cli(
        ["data", "check", "--data-root", str(tmp_path), "--dataset", "eurosat"], capsys, monkeypatch
    )
    assert code == 0
    assert out.splitlines()[0].split()[:2] == ["eurosat", "found"]
    assert "train 20  val 10  test 10" in out


def test_cli_check_tampered_exits_2_listing_each_problem(tmp_path, capsys, monkeypatch):
    split = eurosat(tmp_path)
    images = tmp_path / "eurosat" / "2750"
    (images / "Forest" / "Forest_0.jpg").unlink()
    split["train"].append(["../x.jpg", 0, "Annual Crop Land"])
    split["val"][0][1] = 12
    write_image(tmp_path / "outside.jpg")
    os.symlink(tmp_path / "outside.jpg", images / "River" / "link.jpg")
    split["test"].append(["River/link.jpg", 8, "River"])
    (images / "SeaLake" / "SeaLake_3.jpg").write_bytes(b"garbage")
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    code, out, err = run_cli(
        ["data", "check", "--data-root", str(tmp_path), "--dataset", "eurosat"], capsys, monkeypatch
    )
    assert code == 2 and "Traceback" not in out + err
    assert "eurosat          malformed" in out
    for needle in (
        "missing_image: eurosat/2750/Forest/Forest_0.jpg [train]: no such file",
        "path_escape: eurosat/2750/../x.jpg [train]: '..' in path refused",
        "bad_label: eurosat/2750/AnnualCrop/AnnualCrop_2.jpg [val]: label 12 outside [0, 10)",
        "path_escape: eurosat/2750/River/link.jpg [test]",
        "unreadable: eurosat/2750/SeaLake/SeaLake_3.jpg [test]: cannot read image",
        "to do: path_escape:",
    ):
        assert needle in out, needle


def test_cli_check_all_cards_lists_missing_ones_with_advice(tmp_path, capsys, monkeypatch):
    eurosat(tmp_path)
    code, out, _ = run_cli(["data", "check", "--data-root", str(tmp_path)], capsys, monkeypatch)
    assert code == 0
    assert "dtd              missing" in out and "to do: get it from https://www.robots" in out
    assert "synthetic        generated" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--data-root", "/nonexistent/data"], "--data-root /nonexistent/data: no such folder"),
        (["--data-root", ".", "--dataset", "imagenet-xl"], "unknown dataset 'imagenet-xl'"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, needle, capsys, monkeypatch):
    code, _, err = run_cli(["data", "check", *args], capsys, monkeypatch)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]


def test_cli_info_shows_the_card(capsys, monkeypatch):
    code, out, _ = run_cli(["data", "info", "caltech101"], capsys, monkeypatch)
    assert code == 0
    assert "101_ObjectCategories/" in out and "Fei-Fei" in out and "classes: 100" in out


def test_check_data_root_defaults_to_every_card(tmp_path):
    reports = check_data_root(tmp_path)
    assert {r.name for r in reports} >= {"synthetic", "caltech101", "cifar10", "pacs"}
