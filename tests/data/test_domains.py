"""Domain datasets: one folder per domain, a domain id per image; synthetic backgrounds too."""

import os

import numpy as np
import pytest

from fpl_bench.data.catalog import dataset_card
from fpl_bench.data.sources import load_source
from fpl_bench.data.synthetic import load_synthetic
from fpl_bench.errors import UsageError
from tests.data.helpers import domain_card, domain_folder, write_image


def _load(card, tmp_path, **options):
    return load_source(card, root=tmp_path / "data", options=options, cache_dir=tmp_path / "c")


def test_domain_folders_give_a_domain_id_per_image(tmp_path):
    domain_folder(tmp_path / "data")
    s = _load(domain_card(), tmp_path)
    assert s.domain_names == ("photo", "sketch") and s.classnames == ("ice_cream", "zebra")
    # per (domain, class) of 5 images: round(2.5) = 2 train, 1 val, 2 test
    assert (len(s.train), len(s.val), len(s.test)) == (8, 4, 8)
    for part in (s.train, s.val, s.test):
        assert part.file_backed
        for path, domain, label in zip(part.paths, part.domains, part.labels, strict=True):
            assert path.split("/")[:2] == [s.domain_names[domain], s.classnames[label]]
    assert not any("/other/" in p for p in s.train.paths)  # not a class of the card
    assert len(list((tmp_path / "c" / "data" / "splits").glob("toydom-*.json"))) == 1


def test_a_subset_of_domains_renumbers_them(tmp_path):
    domain_folder(tmp_path / "data")
    s = _load(domain_card(), tmp_path, domain="sketch")
    assert s.domain_names == ("sketch",) and set(s.test.domains.tolist()) == {0}
    assert all(p.startswith("sketch/") for p in s.test.paths)
    with pytest.raises(UsageError, match="unknown domain 'art'; known: photo, sketch"):
        _load(domain_card(), tmp_path, domain="art")


def test_a_missing_class_folder_is_named(tmp_path):
    domain_folder(tmp_path / "data")
    for f in (tmp_path / "data" / "toydom" / "sketch" / "zebra").iterdir():
        f.unlink()
    (tmp_path / "data" / "toydom" / "sketch" / "zebra").rmdir()
    with pytest.raises(UsageError, match=r"no class folder toydom/sketch/zebra/"):
        _load(domain_card(), tmp_path)


def test_a_symlinked_image_pointing_out_is_refused(tmp_path):
    domain_folder(tmp_path / "data")
    write_image(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", tmp_path / "data" / "toydom" / "photo" / "zebra" / "x.png")
    with pytest.raises(UsageError, match=r"path_escape: toydom/photo/zebra/x\.png"):
        _load(domain_card(), tmp_path)


def test_shipped_domain_card_reads_its_layout(tmp_path):
    card = dataset_card("pacs")
    for domain in card.source.domains:
        for name in card.source.classnames:
            for i in range(4):
                write_image(tmp_path / "data" / "pacs" / domain / name / f"{i}.jpg")
    s = _load(card, tmp_path)
    assert s.domain_names == ("art_painting", "cartoon", "photo", "sketch")
    assert np.bincount(s.train.domains).tolist() == [14, 14, 14, 14]


SMALL = {"n_train_per_class": 2, "n_val_per_class": 1, "n_test_per_class": 1}


def test_synthetic_backgrounds_are_domains(tmp_path):
    card = dataset_card("synthetic")
    s = load_source(
        card, root=None, options={**SMALL, "domain": "plain,checker"}, cache_dir=tmp_path
    )
    assert s.domain_names == ("plain", "checker")
    assert len(s.train) == 2 * 64 * 2 and s.train.domains.tolist() == [0] * 128 + [1] * 128
    checker = load_synthetic(**SMALL, domain="checker", cache_dir=tmp_path / "data")
    assert np.array_equal(s.test.images[64:], checker.test.images)
    every = load_source(card, root=None, options={**SMALL, "domain": "all"}, cache_dir=tmp_path)
    assert every.domain_names == ("plain", "noise", "stripes", "checker", "dusk")
    assert len({s.fingerprint, every.fingerprint, checker.fingerprint}) == 3
    one = load_source(card, root=None, options=SMALL, cache_dir=tmp_path)
    assert one.domain_names == ("dusk",)  # the card's default domain
    with pytest.raises(UsageError, match="unknown synthetic domain 'sketch'"):
        load_source(
            card, root=None, options={**SMALL, "domain": "plain,sketch"}, cache_dir=tmp_path
        )
    with pytest.raises(UsageError, match="has no option 'bogus'"):
        load_source(card, root=None, options={"bogus": 1}, cache_dir=tmp_path)
