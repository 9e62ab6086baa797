"""pretrain-tiny: short runs of both phases write seeded fp16 checkpoints the loader accepts; the
patch term trains the tokens the feature cache produces; the shipped model meets its targets."""

import numpy as np
import torch

from fpl_bench.backbone import load_backbone
from fpl_bench.data.synthetic import CLASSNAMES, DUSK_LEVEL, DUSK_TINT, generate
from fpl_bench.pretrain import (
    DUSK_TEMPLATES,
    TEMPLATES,
    _caption_tokens,
    _epoch_images,
    finetune_patches,
    patch_zero_shot_accuracy,
    pretrain_tiny,
    visual_features,
    zero_shot_accuracy,
)
from fpl_bench.weight_sources import EMBEDDED_WEIGHTS

QUIET = dict(batch_size=64, threads=1, log=lambda s: None)


def _load(path):
    return torch.load(path, weights_only=True)


def _assert_fp16_and_small(state, path):
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    assert path.stat().st_size < 10 * 2**20


def test_short_pretraining_writes_a_loadable_seeded_fp16_checkpoint(tmp_path):
    kwargs = dict(seed=3, n_images=128, epochs=1, patch_n_images=128, **QUIET)
    result = pretrain_tiny(
        out=tmp_path / "a.pt",
        phase1_out=tmp_path / "a1.pt",
        patch_steps=2,
        eval_per_class=1,
        **kwargs,
    )
    assert (result["phase1_steps"], result["phase2_steps"], result["steps"]) == (2, 2, 4)
    for key in ("zero_shot_accuracy", "patch_zero_shot_accuracy"):
        assert all(0.0 <= acc <= 1.0 for acc in result[key].values())
    a, a1 = _load(tmp_path / "a.pt"), _load(tmp_path / "a1.pt")
    _assert_fp16_and_small(a, tmp_path / "a.pt")
    assert load_backbone(checkpoint=tmp_path / "a.pt").tag == "checkpoint"
    assert not torch.equal(a["visual.proj"], a1["visual.proj"])  # phase 2 trained

    # phase 1 is seeded: the same seed without phase 2 gives the same phase-1 weights
    pretrain_tiny(out=tmp_path / "b.pt", patch_steps=0, eval_per_class=0, **kwargs)
    b = _load(tmp_path / "b.pt")
    assert all(torch.equal(a1[k], b[k]) for k in a1)
    # and the same bytes under another file name: a retrained model's sha256 is the shipped one's
    assert (tmp_path / "a1.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()

    # pretrain_tiny = phase 1 saved, then finetune_patches from that file (one code path), seeded
    again = finetune_patches(
        init=tmp_path / "a1.pt",
        out=tmp_path / "c.pt",
        seed=3,
        steps=2,
        n_images=128,
        eval_per_class=0,
        **QUIET,
    )
    assert again["steps"] == 2
    c = _load(tmp_path / "c.pt")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_patch_finetune_from_the_shipped_checkpoint_writes_fp16_weights(tmp_path):
    finetune_patches(
        init=EMBEDDED_WEIGHTS,
        out=tmp_path / "a.pt",
        steps=1,
        n_images=64,
        eval_per_class=0,
        **QUIET,
    )
    init, a = _load(EMBEDDED_WEIGHTS), _load(tmp_path / "a.pt")
    _assert_fp16_and_small(a, tmp_path / "a.pt")
    assert a.keys() == init.keys()
    assert not torch.equal(a["visual.proj"], init["visual.proj"])
    load_backbone(checkpoint=tmp_path / "a.pt")


def test_pretraining_corpus_is_daylight_captioned_by_name_and_rarely_dusk_captioned_by_light():
    """Caption id = class + 64 x is_dusk; dusk images take the dusk captions, the rest daylight."""
    images, ids = _epoch_images(seed=0, phase=1, epoch=0, n_images=4000, dusk_fraction=0.05)
    dusk = ids >= 64
    assert 150 <= dusk.sum() <= 250  # 4000 x 0.05 = 200, sd 13.8
    # the dusk light caps every channel of a dusk image; nearly all daylight images go above it
    ceiling = 255.0 * DUSK_LEVEL[1] * DUSK_TINT + 0.5
    assert (images[dusk].reshape(-1, 3) <= ceiling).all()
    brighter = (images[~dusk].reshape(int((~dusk).sum()), -1, 3) > ceiling).any(axis=(1, 2))
    assert brighter.mean() > 0.95, brighter.mean()
    _, none = _epoch_images(seed=0, phase=1, epoch=0, n_images=256, dusk_fraction=0.0)
    _, all_dusk = _epoch_images(seed=0, phase=1, epoch=0, n_images=256, dusk_fraction=1.0)
    assert none.max() < 64 and all_dusk.min() >= 64
    daylight, dusk_tokens = _caption_tokens(TEMPLATES), _caption_tokens(DUSK_TEMPLATES)
    assert daylight.shape[:2] == (len(TEMPLATES), 64)
    assert dusk_tokens.shape[:2] == (len(DUSK_TEMPLATES), 64)
    assert not any("dusk" in t or "dim" in t for t in TEMPLATES)
    assert all(
        any(w in t for w in ("dusk", "dim", "evening", "dark", "violet")) for t in DUSK_TEMPLATES
    )


def test_patch_term_trains_the_tokens_of_the_feature_cache():
    """visual_features (training) and Backbone.encode_images (feature cache) agree."""
    backbone = load_backbone()
    images = generate(np.arange(0, 64, 8), seed=7, domain="checker")  # [8, 32, 32, 3]
    pooled, tokens = backbone.encode_images(images)
    with torch.no_grad():
        own_pooled, own_tokens = visual_features(backbone.model, backbone._to_model_input(images))
    torch.testing.assert_close(torch.nn.functional.normalize(own_pooled, dim=-1), pooled)
    own = torch.nn.functional.normalize(own_tokens, dim=-1)
    torch.testing.assert_close(own, tokens.float(), atol=2e-3, rtol=0)


def _sample(domain):
    labels = np.tile(np.arange(len(CLASSNAMES)), 8)  # 512 images, 8 per class
    return generate(labels, seed=271828, domain=domain), labels


def test_shipped_model_aligns_pooled_and_patch_features_with_text():
    images, labels = _sample("plain")
    backbone = load_backbone()
    pooled = zero_shot_accuracy(backbone, images, labels, CLASSNAMES)
    patches = patch_zero_shot_accuracy(backbone, images, labels, CLASSNAMES)
    # measured on this sample: pooled 0.707, mean-patch 0.689 (2048 test images: 0.724, 0.688)
    assert pooled >= 0.62, pooled
    assert patches >= 0.55, patches
    assert pooled - patches < 0.10  # FedOTP scores patch tokens: they must carry the alignment


def test_shipped_model_knows_dusk_only_when_the_caption_names_it():
    """The embedded default's premise (fpl_bench/data/synthetic.py): on dusk images the
    hand-written daylight prompt scores far below a caption that names the light."""
    images, labels = _sample("dusk")
    backbone = load_backbone()
    hand = zero_shot_accuracy(backbone, images, labels, CLASSNAMES)
    named = zero_shot_accuracy(backbone, images, labels, CLASSNAMES, DUSK_TEMPLATES[0])
    # measured on this sample: hand-written 0.439, "a photo of a {} at dusk." 0.609
    assert 0.30 <= hand <= 0.55, hand
    assert named - hand >= 0.10, (hand, named)
