"""Backbone loading (embedded, checkpoint, tag errors) and image/text encoding."""

import numpy as np
import pytest
import torch
from PIL import Image

from fpl_bench import backbone as backbone_module
from fpl_bench.backbone import EMBEDDED, load_backbone
from fpl_bench.data.synthetic import CLASSNAMES, generate
from fpl_bench.errors import UsageError
from fpl_bench.pretrain import zero_shot_accuracy


@pytest.fixture(scope="module")
def embedded():
    return load_backbone()


@pytest.fixture(scope="module")
def images():
    return generate(np.arange(0, 64, 4), seed=99, domain="stripes")  # [16, 32, 32, 3]


def test_embedded_is_frozen_and_in_eval_mode(embedded):
    assert embedded.name == EMBEDDED
    assert embedded.tag == "embedded"
    assert not embedded.model.training
    assert not any(p.requires_grad for p in embedded.model.parameters())
    assert all(p.dtype == torch.float32 for p in embedded.model.parameters())
    assert len(embedded.weights_digest) == 16
    assert tuple(embedded.preprocess_cfg["size"]) == (32, 32)


def test_encode_images_gives_normalised_pooled_and_tokens(embedded, images):
    pooled, tokens = embedded.encode_images(images, batch_size=5)
    n, d = len(images), embedded.embed_dim
    assert pooled.shape == (n, d) and pooled.dtype == torch.float32
    assert tokens.shape == (n, 64, d) and tokens.dtype == torch.float16  # 8x8 patches of 4 px
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(n))
    torch.testing.assert_close(tokens.float().norm(dim=-1), torch.ones(n, 64), atol=2e-3, rtol=0)


def test_pooled_matches_open_clip_encode_image(embedded, images):
    pooled, _ = embedded.encode_images(images)
    x = torch.stack([embedded.preprocess(Image.fromarray(image)) for image in images])
    with torch.no_grad():
        expected = embedded.model.encode_image(x, normalize=True)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


def test_tokens_are_projected_patch_tokens(embedded, images):
    _, tokens = embedded.encode_images(images[:2])
    visual = embedded.model.visual
    x = embedded._to_model_input(images[:2])
    with torch.no_grad():
        h = visual.transformer(visual._embeds(x))
        expected = torch.nn.functional.normalize(visual.ln_post(h)[:, 1:] @ visual.proj, dim=-1)
    torch.testing.assert_close(tokens.float(), expected, atol=2e-3, rtol=0)


def test_tensor_path_matches_pil_transform(embedded, images):
    fast = embedded._to_model_input(images)
    pil = torch.stack([embedded.preprocess(Image.fromarray(image)) for image in images])
    torch.testing.assert_close(fast, pil, atol=1e-6, rtol=0)


def test_other_sizes_go_through_the_pil_transform(embedded):
    big = np.random.default_rng(0).integers(0, 256, size=(2, 48, 40, 3), dtype=np.uint8)
    pooled, tokens = embedded.encode_images(big)
    assert pooled.shape == (2, embedded.embed_dim)
    assert tokens.shape == (2, 64, embedded.embed_dim)


def test_encode_texts_normalised(embedded):
    text = embedded.encode_texts(["a photo of a red circle.", "a photo of a blue star."])
    assert text.shape == (2, embedded.embed_dim)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize("wrapped", [False, True])
def test_checkpoint_file_gives_identical_features(embedded, images, tmp_path, wrapped):
    state = embedded.model.state_dict()
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": state, "epoch": 3} if wrapped else state, path)
    loaded = load_backbone(EMBEDDED, checkpoint=path)
    assert loaded.tag == "checkpoint"
    expected_pooled, expected_tokens = embedded.encode_images(images)
    pooled, tokens = loaded.encode_images(images)
    assert torch.equal(pooled, expected_pooled)
    assert torch.equal(tokens, expected_tokens)


def test_corrupt_checkpoint_raises_usage_error(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(UsageError, match=r"corrupt\.pt"):
        load_backbone(EMBEDDED, checkpoint=path)


def test_missing_checkpoint_raises_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_backbone(EMBEDDED, checkpoint=tmp_path / "nope.pt")


def test_mismatching_checkpoint_raises_usage_error(embedded, tmp_path):
    state = dict(embedded.model.state_dict())
    state.pop("logit_scale")
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "other.pt"
    torch.save(state, path)
    with pytest.raises(UsageError, match=r"1 missing .*1 unexpected"):
        load_backbone(EMBEDDED, checkpoint=path)


def test_unknown_model_name_raises_usage_error():
    with pytest.raises(UsageError, match=r"unknown open_clip model 'ViT-Q-99'.*fpl-tiny-vit"):
        load_backbone("ViT-Q-99")


def test_unknown_tag_names_the_known_tags():
    with pytest.raises(UsageError, match="openai"):
        load_backbone("ViT-B-32", pretrained="no-such-tag")


def test_unfetchable_tag_says_to_pass_a_checkpoint(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(backbone_module, "_cached_tag_file", lambda cfg: None)
    monkeypatch.setattr(backbone_module.open_clip, "download_pretrained", offline)
    with pytest.raises(UsageError, match="--checkpoint PATH"):
        load_backbone("ViT-B-32", pretrained="openai")


def test_embedded_model_is_trained_zero_shot_accuracy(embedded):
    labels = np.tile(np.arange(64), 4)
    images = generate(labels, seed=424242, domain="plain")
    assert zero_shot_accuracy(embedded, images, labels, CLASSNAMES) > 0.4
