"""Procedurally generated, seeded image-classification source: 64 "{color} {shape}" classes.

Every image is 32x32x3 uint8 and shows one coloured shape (8 colours x 8 shapes) at a random
position, size and rotation on a background whose texture is set by the *domain*:

    plain    one grey-ish colour
    noise    grey-ish colour plus per-pixel colour noise
    stripes  soft stripes of two grey-ish colours at a random angle and period
    checker  a rotated checkerboard of two grey-ish colours
    dusk     a plain background, and the whole image seen in dim violet light: every pixel times
             DUSK_TINT and a per-image level in [0.75, 0.95]. Colours move onto their neighbours
             (orange looks like daylight brown, pink like purple, yellow like dark orange), so
             the class words of daylight images no longer name what the pixels show.

The first four are the *daylight* domains. The pretraining corpus of the embedded CLIP
(fpl_bench/pretrain.py) is mostly daylight, captioned by class name alone; dusk images are rare
in it and always captioned with their light ("a red circle at dusk."). The embedded default
downstream task is dusk: the hand-written prompt "a photo of a {}." describes daylight, so
zero-shot CLIP confuses the colours the light moves, and a prompt learned from a few dusk images
can recover them. That is the gap prompt learning closes on real data (EuroSAT's "a centered
satellite photo of", FGVC's "a type of aircraft"): the downstream images are a part of the
pretraining distribution the usual captions do not describe.

Class order is a Latin square, not colour-major: class k is colour ``k % 8`` with shape
``(k % 8 + k // 8) % 8`` (`CLASS_COLOR`, `CLASS_SHAPE`). Every run of 8 consecutive ids holds each
colour and each shape once, so the base/novel cut at ceil(64 / 2) = 32 (`split.base_novel_split`,
CoOp's rule) puts every colour and every shape among both the base and the novel classes, and the
novel classes are unseen *combinations* of seen attributes. (Colour-major order, version 1, made
the novel half exactly the four colours never trained on.) The class names are plain English words
so a CLIP text encoder can read them ("red circle", "blue star"); a class *name* renders exactly as
in version 1, only its id moved (`COLOR_MAJOR` maps a version-1 id to today's).

Rasterisation is vectorised: each shape is a signed-distance function evaluated on the pixel grid
of a whole batch of images at once (one Python loop over the 8 shape kinds, none over pixels);
edges are anti-aliased by `alpha = clip(0.5 - distance_in_pixels, 0, 1)`.

Determinism: `generate(labels, seed=s, domain=d)` is a pure function of (labels, s, d). The shape
parameters (position, size, rotation, colour jitter) come from one generator seeded by (s, 0) and
the background from another seeded by (s, 1 + domain index), so the same seed shows the same
foregrounds on every domain: a controlled domain shift. `load_synthetic` derives one seed per split
(train/val/test) from its `seed`, so no image repeats across splits.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fpl_bench.data.imageset import ImageSet, Splits
from fpl_bench.errors import UsageError
from fpl_bench.io import write_atomic

# Bump whenever generated pixels or the class order change: it is part of the fingerprint, so
# cached splits and features of an older version are never reused. v2: Latin-square class order.
# v3: the dusk domain (the embedded default downstream task) and a pretraining corpus where it is
# rare; the daylight domains' pixels are those of v2.
VERSION = "fpl-synthetic-v3"
CLASS_ORDER = "latin-square"  # recorded in the fingerprint too
IMAGE_SIZE = 32

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "brown")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart", "ring", "moon")
DOMAINS: tuple[str, ...] = ("plain", "noise", "stripes", "checker", "dusk")
DAYLIGHT: tuple[str, ...] = DOMAINS[:4]
# Dusk light: per-channel gain (violet: red and green dimmed more than blue).  # [3]
DUSK_TINT = np.array([0.62, 0.48, 0.78], dtype=np.float32)
DUSK_LEVEL = (0.75, 0.95)

_N = len(COLORS)  # == len(SHAPES): the Latin square needs a square
_IDS = np.arange(_N * _N, dtype=np.int64)
CLASS_COLOR: np.ndarray = _IDS % _N  # [64] colour index of each class id
CLASS_SHAPE: np.ndarray = (_IDS % _N + _IDS // _N) % _N  # [64] shape index of each class id
CLASS_COLOR.setflags(write=False)
CLASS_SHAPE.setflags(write=False)
CLASSNAMES: tuple[str, ...] = tuple(
    f"{COLORS[c]} {SHAPES[s]}"
    for c, s in zip(CLASS_COLOR.tolist(), CLASS_SHAPE.tolist(), strict=True)
)
# COLOR_MAJOR[color * 8 + shape] = today's id of that class (version 1 used colour-major ids).
COLOR_MAJOR: np.ndarray = np.empty(_N * _N, dtype=np.int64)
COLOR_MAJOR[CLASS_COLOR * _N + CLASS_SHAPE] = _IDS
COLOR_MAJOR.setflags(write=False)


def class_index(color: str, shape: str) -> int:
    """Class id of "{color} {shape}"."""
    return int(COLOR_MAJOR[COLORS.index(color) * _N + SHAPES.index(shape)])


# Base RGB of each colour in [0, 1], in COLORS order.  # [8, 3]
_COLOR_RGB = np.array(
    [
        [0.86, 0.10, 0.10],  # red
        [0.10, 0.62, 0.16],  # green
        [0.12, 0.25, 0.88],  # blue
        [0.95, 0.86, 0.10],  # yellow
        [0.98, 0.52, 0.06],  # orange
        [0.52, 0.14, 0.68],  # purple
        [0.98, 0.52, 0.78],  # pink
        [0.47, 0.27, 0.10],  # brown
    ],
    dtype=np.float32,
)

_CHUNK = 2048  # images rasterised at once; fixed, so the background noise stream is too
_SPLITS = ("train", "val", "test")

# Pixel-centre coordinates of the 32x32 grid, x to the right, y downwards.  # [H, W] each
_YS, _XS = np.meshgrid(
    np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5,
    np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5,
    indexing="ij",
)


# ----------------------------------------------------------------------------- signed distances
# Each takes local coordinates u, v ([n, H, W], y up, the shape roughly inside [-1, 1]^2) and
# returns the signed distance to the outline in the same units (negative inside).


def _sd_box(u: np.ndarray, v: np.ndarray, half_w: float, half_h: float) -> np.ndarray:
    """Axis-aligned box with half sizes (half_w, half_h)."""
    qx = np.abs(u) - half_w
    qy = np.abs(v) - half_h
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0)


def _sd_polygon(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Simple polygon `vertices` [K, 2]: min distance to the edges, sign by even-odd crossings.

    After I. Quilez, "2D distance functions" (sdPolygon).
    """
    d2 = (u - vertices[0, 0]) ** 2 + (v - vertices[0, 1]) ** 2
    sign = np.ones_like(u)
    k = len(vertices)
    for i in range(k):
        xi, yi = vertices[i]
        xj, yj = vertices[i - 1]
        ex, ey = xj - xi, yj - yi
        wx, wy = u - xi, v - yi
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        bx, by = wx - ex * t, wy - ey * t
        np.minimum(d2, bx * bx + by * by, out=d2)
        c1 = v >= yi
        c2 = v < yj
        c3 = ex * wy > ey * wx
        flip = (c1 & c2 & c3) | (~c1 & ~c2 & ~c3)
        sign[flip] *= -1.0
    return sign * np.sqrt(d2)


def _star_vertices(points: int = 5, outer: float = 1.0, inner: float = 0.45) -> np.ndarray:
    """Vertices [2 * points, 2] of a star with one tip pointing up."""
    angles = np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1).astype(np.float32)


_STAR = _star_vertices()


def _sd_circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.hypot(u, v) - 0.85


def _sd_square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _sd_box(u, v, 0.75, 0.75)


def _sd_triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Equilateral triangle, tip up, half side r (I. Quilez, sdEquilateralTriangle)."""
    r, k = 0.95, np.sqrt(3.0)
    px = np.abs(u) - r
    py = v + 0.1 + r / k
    fold = px + k * py > 0.0
    px, py = np.where(fold, (px - k * py) / 2.0, px), np.where(fold, (-k * px - py) / 2.0, py)
    px = px - np.clip(px, -2.0 * r, 0.0)
    return -np.hypot(px, py) * np.sign(py)


def _sd_star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _sd_polygon(u, v, _STAR)


def _sd_cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.minimum(_sd_box(u, v, 0.85, 0.28), _sd_box(u, v, 0.28, 0.85))


def _sd_heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Heart, tip down (I. Quilez, sdHeart, scaled so it spans about [-1, 1]^2)."""
    scale = 0.6
    px = np.abs(u) * scale
    py = (v + 0.9) * scale
    lobe = np.hypot(px - 0.25, py - 0.75) - np.sqrt(2.0) / 4.0
    m = 0.5 * np.maximum(px + py, 0.0)
    body = np.sqrt(np.minimum(px**2 + (py - 1.0) ** 2, (px - m) ** 2 + (py - m) ** 2))
    body = body * np.sign(px - py)
    return np.where(px + py > 1.0, lobe, body) / scale


def _sd_ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.abs(np.hypot(u, v) - 0.7) - 0.22


def _sd_moon(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Crescent: a disc minus a smaller disc shifted to the upper right."""
    outer = np.hypot(u, v) - 0.9
    bite = np.hypot(u - 0.45, v - 0.25) - 0.75
    return np.maximum(outer, -bite)


_SDF: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _sd_circle,
    "square": _sd_square,
    "triangle": _sd_triangle,
    "star": _sd_star,
    "cross": _sd_cross,
    "heart": _sd_heart,
    "ring": _sd_ring,
    "moon": _sd_moon,
}
assert tuple(_SDF) == SHAPES


# ----------------------------------------------------------------------------- backgrounds


def _greyish(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    """n low-saturation colours [n, 3]: a grey level in [lo, hi] plus a small tint."""
    level = rng.uniform(lo, hi, size=(n, 1))
    tint = rng.normal(0.0, 0.03, size=(n, 3))
    return np.clip(level + tint, 0.0, 1.0).astype(np.float32)


def _two_tone(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A dark and a light grey-ish colour per image, [n, 3] each."""
    return _greyish(rng, 0.15, 0.45, n), _greyish(rng, 0.55, 0.9, n)


def _background(rng: np.random.Generator, domain: str, n: int) -> np.ndarray:
    """Backgrounds [n, H, W, 3] float32 in [0, 1] for one domain."""
    shape = (n, IMAGE_SIZE, IMAGE_SIZE, 1)
    if domain in ("plain", "dusk"):
        base = _greyish(rng, 0.2, 0.85, n)
        return np.broadcast_to(base[:, None, None, :], (n, IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    if domain == "noise":
        base = _greyish(rng, 0.25, 0.8, n)[:, None, None, :]
        noise = rng.normal(0.0, 0.12, size=(n, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
        return np.clip(base + noise, 0.0, 1.0)
    dark, light = _two_tone(rng, n)
    angle = rng.uniform(0.0, np.pi, size=(n, 1, 1)).astype(np.float32)
    along = _XS * np.cos(angle) + _YS * np.sin(angle)  # [n, H, W]
    across = -_XS * np.sin(angle) + _YS * np.cos(angle)
    if domain == "stripes":
        period = rng.uniform(4.0, 10.0, size=(n, 1, 1)).astype(np.float32)
        phase = rng.uniform(0.0, 2 * np.pi, size=(n, 1, 1)).astype(np.float32)
        wave = np.sin(2 * np.pi * along / period + phase)
        mix = 1.0 / (1.0 + np.exp(-4.0 * wave))
    elif domain == "checker":
        cell = rng.uniform(3.0, 8.0, size=(n, 1, 1)).astype(np.float32)
        offset = rng.uniform(0.0, 8.0, size=(n, 1, 1)).astype(np.float32)
        mix = (np.floor((along + offset) / cell) + np.floor((across + offset) / cell)) % 2
    else:  # pragma: no cover - _check_domain runs first
        raise AssertionError(domain)
    mix = mix.reshape(shape).astype(np.float32)
    return dark[:, None, None, :] * (1.0 - mix) + light[:, None, None, :] * mix


# ----------------------------------------------------------------------------- generation


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise UsageError(f"unknown synthetic domain {domain!r}; known: {', '.join(DOMAINS)}")


def _render_chunk(
    labels: np.ndarray,
    params: dict[str, np.ndarray],
    background: np.ndarray,
    light: np.ndarray | None = None,
) -> np.ndarray:
    """Draw the shapes described by `params` (arrays [n]) over `background` [n, H, W, 3], then
    multiply every pixel by `light` [n, 3] (the dusk domain) if given."""
    n = len(labels)
    color = _COLOR_RGB[CLASS_COLOR[labels]] * params["brightness"][:, None]  # [n, 3]
    color = np.clip(color + params["jitter"], 0.0, 1.0)
    alpha = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    shape_idx = CLASS_SHAPE[labels]
    for k, shape in enumerate(SHAPES):
        sel = np.flatnonzero(shape_idx == k)
        if sel.size == 0:
            continue
        scale = params["scale"][sel][:, None, None]
        cos = np.cos(params["angle"][sel])[:, None, None]
        sin = np.sin(params["angle"][sel])[:, None, None]
        dx = _XS - params["cx"][sel][:, None, None]  # [m, H, W], x right
        dy = params["cy"][sel][:, None, None] - _YS  # y up
        u = (dx * cos + dy * sin) / scale  # rotate by -angle, then unit size
        v = (-dx * sin + dy * cos) / scale
        dist_px = _SDF[shape](u, v) * scale
        alpha[sel] = np.clip(0.5 - dist_px, 0.0, 1.0)
    a = alpha[..., None]
    image = background * (1.0 - a) + color[:, None, None, :] * a
    if light is not None:
        image = image * light[:, None, None, :]
    return (image * 255.0 + 0.5).astype(np.uint8)


def generate(labels: np.ndarray, *, seed: int, domain: str = "plain") -> np.ndarray:
    """Images [N, 32, 32, 3] uint8; image i shows class `labels[i]` (index into CLASSNAMES).

    Deterministic in (labels, seed, domain). Shape half-size 6.5-12 px, rotation within +-25
    degrees (so a square never turns into a diamond), colour = base * U(0.85, 1.1) + N(0, 0.05)
    per channel.
    """
    _check_domain(domain)
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSNAMES)):
        raise ValueError(f"labels must lie in [0, {len(CLASSNAMES)})")
    labels = labels.astype(np.int64)
    n = len(labels)

    fg = np.random.default_rng([seed, 0])
    scale = fg.uniform(6.5, 12.0, size=n)
    params = {
        "scale": scale,
        "angle": np.deg2rad(fg.uniform(-25.0, 25.0, size=n)),
        "cx": fg.uniform(0.0, 1.0, size=n) * (IMAGE_SIZE - 2 * scale) + scale,
        "cy": fg.uniform(0.0, 1.0, size=n) * (IMAGE_SIZE - 2 * scale) + scale,
        "brightness": fg.uniform(0.85, 1.1, size=n),
        "jitter": fg.normal(0.0, 0.05, size=(n, 3)),
    }
    params = {k: p.astype(np.float32) for k, p in params.items()}

    bg = np.random.default_rng([seed, 1 + DOMAINS.index(domain)])
    out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        chunk_params = {k: p[start:stop] for k, p in params.items()}
        background = _background(bg, domain, stop - start)
        light = None
        if domain == "dusk":
            level = bg.uniform(*DUSK_LEVEL, size=(stop - start, 1)).astype(np.float32)
            light = DUSK_TINT * level
        out[start:stop] = _render_chunk(labels[start:stop], chunk_params, background, light)
    return out


# ----------------------------------------------------------------------------- splits + cache


SyntheticSplits = Splits  # train/val/test of one domain; `fingerprint` identifies the pixels


def split_seed(seed: int, split: str) -> int:
    """Seed of one split (train/val/test) derived from the dataset seed: distinct per split."""
    state = np.random.SeedSequence([seed, 0x5EED, _SPLITS.index(split)]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


def fingerprint(
    *, n_train_per_class: int, n_val_per_class: int, n_test_per_class: int, domain: str, seed: int
) -> str:
    """sha256 hex of everything the generated splits depend on, VERSION included."""
    payload = {
        "version": VERSION,
        "class_order": CLASS_ORDER,
        "n_train_per_class": n_train_per_class,
        "n_val_per_class": n_val_per_class,
        "n_test_per_class": n_test_per_class,
        "domain": domain,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _make_split(n_per_class: int, *, seed: int, split: str, domain: str) -> ImageSet:
    labels = np.repeat(np.arange(len(CLASSNAMES), dtype=np.int64), n_per_class)
    images = generate(labels, seed=split_seed(seed, split), domain=domain)
    return ImageSet(images=images, labels=labels)


def _save_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez, written atomically (readers never see half a file)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)

    write_atomic(path, write)


def load_synthetic(
    *,
    n_train_per_class: int = 64,
    n_val_per_class: int = 8,
    n_test_per_class: int = 32,
    domain: str = "plain",
    seed: int = 0,
    cache_dir: Path | None = None,
) -> SyntheticSplits:
    """Generate (or read from `cache_dir`) the train/val/test splits of one domain.

    Labels are sorted by class: `np.repeat(arange(64), n_per_class)`. With `cache_dir`, the splits
    are stored as `synthetic-<fingerprint>.npz` and read back on the next call.
    """
    _check_domain(domain)
    for name, value in (
        ("n_train_per_class", n_train_per_class),
        ("n_val_per_class", n_val_per_class),
        ("n_test_per_class", n_test_per_class),
    ):
        if value < 0:
            raise UsageError(f"{name} must be >= 0, got {value}")
    if seed < 0:
        raise UsageError(f"synthetic seed must be >= 0, got {seed}")
    digest = fingerprint(
        n_train_per_class=n_train_per_class,
        n_val_per_class=n_val_per_class,
        n_test_per_class=n_test_per_class,
        domain=domain,
        seed=seed,
    )
    path = None if cache_dir is None else Path(cache_dir) / f"synthetic-{digest}.npz"
    if path is not None and path.is_file():
        with np.load(path) as data:
            sets = {
                split: ImageSet(images=data[f"{split}_images"], labels=data[f"{split}_labels"])
                for split in _SPLITS
            }
    else:
        sizes = dict(
            zip(_SPLITS, (n_train_per_class, n_val_per_class, n_test_per_class), strict=True)
        )
        sets = {
            split: _make_split(sizes[split], seed=seed, split=split, domain=domain)
            for split in _SPLITS
        }
        if path is not None:
            arrays = {}
            for split, image_set in sets.items():
                arrays[f"{split}_images"] = image_set.images
                arrays[f"{split}_labels"] = image_set.labels
            _save_atomic(path, arrays)
    return Splits(
        classnames=CLASSNAMES,
        train=sets["train"],
        val=sets["val"],
        test=sets["test"],
        fingerprint=digest,
        domain_names=(domain,),
    )
