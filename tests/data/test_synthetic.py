"""Synthetic image source: seeded, shaped as promised, cached atomically, domains validated."""

import numpy as np
import pytest

from fpl_bench.data import synthetic
from fpl_bench.data.split import base_novel_split
from fpl_bench.data.synthetic import (
    CLASS_COLOR,
    CLASS_SHAPE,
    CLASSNAMES,
    COLOR_MAJOR,
    COLORS,
    DAYLIGHT,
    DOMAINS,
    DUSK_LEVEL,
    DUSK_TINT,
    SHAPES,
    class_index,
    generate,
    load_synthetic,
)
from fpl_bench.errors import UsageError

SMALL = {"n_train_per_class": 2, "n_val_per_class": 1, "n_test_per_class": 1}


def test_classnames_are_a_latin_square_of_color_and_shape():
    assert len(CLASSNAMES) == 64
    assert len(set(CLASSNAMES)) == 64
    assert CLASSNAMES[0] == "red circle"
    for k, name in enumerate(CLASSNAMES):
        assert name == f"{COLORS[k % 8]} {SHAPES[(k % 8 + k // 8) % 8]}"
        assert name == f"{COLORS[CLASS_COLOR[k]]} {SHAPES[CLASS_SHAPE[k]]}"
        color, shape = name.split()
        assert class_index(color, shape) == k
    for block in range(8):  # every 8 consecutive ids: each colour once, each shape once
        ids = np.arange(8 * block, 8 * block + 8)
        assert sorted(CLASS_COLOR[ids]) == list(range(8))
        assert sorted(CLASS_SHAPE[ids]) == list(range(8))


def test_base_and_novel_classes_share_every_color_and_shape_but_no_pair():
    base, novel = base_novel_split(len(CLASSNAMES))  # the standard cut at ceil(64 / 2) = 32
    halves = [[CLASSNAMES[k].split() for k in ids] for ids in (base, novel)]
    for half in halves:
        assert {color for color, _ in half} == set(COLORS)
        assert {shape for _, shape in half} == set(SHAPES)
    pairs = [{tuple(p) for p in half} for half in halves]
    assert not pairs[0] & pairs[1]  # novel = unseen combinations of seen attributes
    assert len(pairs[0] | pairs[1]) == 64


def test_color_major_maps_old_ids_to_the_same_names():
    old = [f"{color} {shape}" for color in COLORS for shape in SHAPES]  # version-1 order
    assert [CLASSNAMES[i] for i in COLOR_MAJOR] == old


def test_a_class_renders_by_its_name():
    # the shape's colour is the named colour: the most saturated pixel of a plain image
    labels = np.array([class_index("blue", "square"), class_index("red", "heart")])
    images = generate(labels, seed=4, domain="plain").astype(int)
    for image, channel in zip(images, (2, 0), strict=True):
        flat = image.reshape(-1, 3)
        strongest = flat[np.argmax(flat.max(axis=1) - flat.min(axis=1))]
        assert strongest.argmax() == channel


def test_dusk_light_moves_colours_onto_their_daylight_neighbours():
    """The world's premise, by hand: under dusk light at its middle level, the nearest daylight
    colour (RGB distance) of dusk orange is brown, of dusk pink purple, of dusk yellow brown."""
    rgb = synthetic._COLOR_RGB.astype(np.float64)
    level = sum(DUSK_LEVEL) / 2
    nearest = {}
    for c, colour in enumerate(COLORS):
        dusk = rgb[c] * DUSK_TINT * level
        nearest[colour] = COLORS[int(np.argmin(((rgb - dusk) ** 2).sum(axis=1)))]
    assert nearest["orange"] == "brown"
    assert nearest["pink"] == "purple"
    assert nearest["yellow"] == "brown"
    # e.g. orange (0.98, 0.52, 0.06) * (0.62, 0.48, 0.78) * 0.85 = (0.516, 0.212, 0.040);
    # brown is (0.47, 0.27, 0.10)
    np.testing.assert_allclose(
        rgb[COLORS.index("orange")] * DUSK_TINT * level, [0.51646, 0.212160, 0.039780], atol=1e-5
    )


def test_dusk_images_are_daylight_scenes_seen_in_dim_violet_light():
    """Same foregrounds as daylight (one seed), every pixel at most 0.95 x tint x 255, and the
    shape's pixels are the plain image's shape pixels times one light per image."""
    labels = np.array([class_index(colour, "square") for colour in COLORS])  # solid centres
    dusk = generate(labels, seed=11, domain="dusk").astype(np.float64)
    plain = generate(labels, seed=11, domain="plain").astype(np.float64)
    ceiling = 255.0 * DUSK_LEVEL[1] * DUSK_TINT + 0.5
    assert (dusk.reshape(-1, 3) <= ceiling).all()
    # the centre of each square, drawn from the foreground stream as `generate` draws it
    fg = np.random.default_rng([11, 0])
    scale = fg.uniform(6.5, 12.0, size=8)
    fg.uniform(-25.0, 25.0, size=8)  # angles
    cx = fg.uniform(0.0, 1.0, size=8) * (32 - 2 * scale) + scale
    cy = fg.uniform(0.0, 1.0, size=8) * (32 - 2 * scale) + scale
    for i in range(8):
        y, x = int(cy[i]), int(cx[i])
        bright = plain[i, y, x] > 40  # channels bright enough for rounding not to matter
        light = dusk[i, y, x][bright] / plain[i, y, x][bright] / DUSK_TINT[bright]
        assert np.ptp(light) < 0.06, (COLORS[i], light)
        assert DUSK_LEVEL[0] - 0.05 <= light.mean() <= DUSK_LEVEL[1] + 0.05, (COLORS[i], light)


def test_daylight_is_the_first_four_domains_and_dusk_is_last():
    assert DAYLIGHT == ("plain", "noise", "stripes", "checker")
    assert DOMAINS[-1] == "dusk" and DOMAINS[:-1] == DAYLIGHT


@pytest.mark.parametrize("domain", DOMAINS)
def test_same_seed_same_images(domain):
    labels = np.arange(64)
    first = generate(labels, seed=7, domain=domain)
    second = generate(labels, seed=7, domain=domain)
    assert first.shape == (64, 32, 32, 3)
    assert first.dtype == np.uint8
    np.testing.assert_array_equal(first, second)


def test_different_seeds_differ():
    labels = np.arange(64)
    first = generate(labels, seed=1)
    second = generate(labels, seed=2)
    differs = (first != second).reshape(64, -1).any(axis=1)
    assert differs.all()


def test_domains_change_the_background_only():
    labels = np.arange(64)
    plain = generate(labels, seed=3, domain="plain")
    noisy = generate(labels, seed=3, domain="noise")
    assert (plain != noisy).any()
    # a plain background is one colour: the image corners agree with each other
    corners = plain[:, [0, 0, -1, -1], [0, -1, 0, -1]]  # [64, 4, 3]
    assert (
        np.abs(corners.astype(int) - corners[:, :1].astype(int)).max(axis=(1, 2)) <= 1
    ).mean() > 0.9


def test_empty_labels_give_no_images():
    assert generate(np.zeros(0, dtype=np.int64), seed=0).shape == (0, 32, 32, 3)


def test_out_of_range_labels_raise():
    with pytest.raises(ValueError):
        generate(np.array([64]), seed=0)


def test_load_synthetic_labels_shapes_dtype():
    splits = load_synthetic(**SMALL, seed=0)
    assert splits.classnames == CLASSNAMES
    for image_set, n in ((splits.train, 2), (splits.val, 1), (splits.test, 1)):
        assert image_set.images.shape == (64 * n, 32, 32, 3)
        assert image_set.images.dtype == np.uint8
        assert image_set.labels.dtype == np.int64
        np.testing.assert_array_equal(image_set.labels, np.repeat(np.arange(64), n))
    assert len(splits.fingerprint) == 64


def test_splits_share_no_image():
    splits = load_synthetic(**SMALL, seed=0)
    seen = {image.tobytes() for image in splits.train.images}
    assert not any(image.tobytes() in seen for image in splits.val.images)
    assert not any(image.tobytes() in seen for image in splits.test.images)


def test_fingerprint_follows_parameters():
    base = load_synthetic(**SMALL, seed=0).fingerprint
    assert load_synthetic(**SMALL, seed=0).fingerprint == base
    assert load_synthetic(**SMALL, seed=1).fingerprint != base
    assert load_synthetic(**SMALL, seed=0, domain="checker").fingerprint != base


def test_fingerprint_names_version_and_class_order(monkeypatch):
    """Caches written before the class reorder (v1) are never reused: the key changes."""
    now = load_synthetic(**SMALL, seed=0).fingerprint
    monkeypatch.setattr(synthetic, "VERSION", "fpl-synthetic-v1")
    assert load_synthetic(**SMALL, seed=0).fingerprint != now
    monkeypatch.setattr(synthetic, "VERSION", "fpl-synthetic-v2")  # before the dusk domain
    assert load_synthetic(**SMALL, seed=0).fingerprint != now
    monkeypatch.setattr(synthetic, "VERSION", "fpl-synthetic-v3")
    monkeypatch.setattr(synthetic, "CLASS_ORDER", "color-major")
    assert load_synthetic(**SMALL, seed=0).fingerprint != now


def test_one_domain_splits_carry_its_name_and_domain_zero():
    splits = load_synthetic(**SMALL, seed=0, domain="stripes")
    assert splits.domain_names == ("stripes",)
    assert not splits.train.file_backed and (splits.test.domains == 0).all()


def test_cache_round_trip_gives_identical_arrays(tmp_path, monkeypatch):
    fresh = load_synthetic(**SMALL, seed=5, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [f"synthetic-{fresh.fingerprint}.npz"]

    def no_generation(*args, **kwargs):
        raise AssertionError("a cached split must not be generated again")

    monkeypatch.setattr(synthetic, "generate", no_generation)
    cached = load_synthetic(**SMALL, seed=5, cache_dir=tmp_path)
    assert cached.fingerprint == fresh.fingerprint
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(cached, split).images, getattr(fresh, split).images)
        np.testing.assert_array_equal(getattr(cached, split).labels, getattr(fresh, split).labels)
        assert getattr(cached, split).labels.dtype == np.int64


def test_unknown_domain_raises_usage_error():
    with pytest.raises(UsageError, match="plain, noise, stripes, checker"):
        generate(np.arange(3), seed=0, domain="sketch")
    with pytest.raises(UsageError, match="sketch"):
        load_synthetic(**SMALL, domain="sketch")
