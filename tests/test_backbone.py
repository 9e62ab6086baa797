"""Backbone loading (embedded, checkpoint, tag errors) and image/text encoding."""

import json
import time
import warnings

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from fpl_bench import backbone as backbone_module
from fpl_bench import weight_sources
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


def test_unfetchable_tag_says_to_pass_a_file(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(weight_sources, "_cached_tag_file", lambda cfg: None)
    monkeypatch.setattr(weight_sources, "_reachable", lambda url, **kw: True)
    monkeypatch.setattr(weight_sources.open_clip, "download_pretrained", offline)
    with pytest.raises(UsageError, match=r"could not fetch .*--pretrained /path/to/ViT-B-32\.pt"):
        load_backbone("ViT-B-32", pretrained="openai")


def test_embedded_model_is_trained_zero_shot_accuracy(embedded):
    labels = np.tile(np.arange(64), 4)
    images = generate(labels, seed=424242, domain="plain")
    assert zero_shot_accuracy(embedded, images, labels, CLASSNAMES) > 0.4


# ----------------------------------------------------------------------------- tags offline


@pytest.fixture
def empty_caches(monkeypatch, tmp_path):
    """No weights in any cache: HF hub cache and ~/.cache/clip point into tmp_path."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_offline_missing_tag_is_one_fast_line_naming_the_files(empty_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(weight_sources, "_reachable", _never_called)
    t0 = time.perf_counter()
    with pytest.raises(UsageError) as info:
        load_backbone("ViT-B-16", pretrained="openai")
    assert time.perf_counter() - t0 < 2.0
    message = str(info.value)
    assert "\n" not in message
    assert str(empty_caches / ".cache" / "clip" / "ViT-B-16.pt") in message
    assert "models--timm--vit_base_patch16_clip_224.openai" in message
    assert "HF_HUB_OFFLINE" in message
    assert "--pretrained /path/to/ViT-B-16.pt" in message


def test_unreachable_host_fails_without_downloading(empty_caches, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(weight_sources, "_reachable", lambda url, **kw: False)
    monkeypatch.setattr(weight_sources.open_clip, "download_pretrained", _never_called)
    with pytest.raises(UsageError, match=r"huggingface\.co cannot be reached.*--pretrained /path"):
        load_backbone("RN50", pretrained="openai")


def _never_called(*args, **kwargs):
    raise AssertionError("must not be called")


def test_cached_tag_file_finds_the_hub_copy_then_the_url_copy(empty_caches):
    cfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    assert weight_sources._cached_tag_file(cfg) is None
    url_copy = empty_caches / ".cache" / "clip" / "ViT-B-32.pt"
    url_copy.parent.mkdir(parents=True)
    url_copy.write_bytes(b"weights")
    assert weight_sources._cached_tag_file(cfg) == url_copy
    repo = empty_caches / "hub" / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    hub_copy = repo / "snapshots" / "abc123" / "open_clip_model.safetensors"
    hub_copy.parent.mkdir(parents=True)
    hub_copy.write_bytes(b"weights")
    assert weight_sources._cached_tag_file(cfg) == hub_copy


# ----------------------------------------------------------------------------- other sources


TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_model_config_json_with_pretrained_none_is_seeded_random(tmp_path, images):
    path = tmp_path / "fpl-test-micro.json"
    path.write_text(json.dumps(TINY_CONFIG))
    rng_before = torch.random.get_rng_state()
    first = load_backbone(str(path), pretrained="none")
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller's RNG untouched
    second = load_backbone(str(path), pretrained="none")
    assert (first.name, first.tag) == ("fpl-test-micro", "random")
    assert first.weights_digest == second.weights_digest
    other = second.model.state_dict()
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, other[key]), key
    pooled, tokens = first.encode_images(images[:3])
    assert pooled.shape == (3, 32) and tokens.shape == (3, 16, 32)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not readable JSON"),
        (json.dumps({"embed_dim": 8}), "lacks vision_cfg, text_cfg"),
    ],
)
def test_bad_model_config_json_is_a_usage_error(tmp_path, content, match):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=match):
        load_backbone(str(path), pretrained="none")


def test_model_config_json_may_not_shadow_a_known_model(tmp_path):
    path = tmp_path / "ViT-B-16.json"
    path.write_text(json.dumps(TINY_CONFIG))
    with pytest.raises(UsageError, match="named like the registered model ViT-B-16"):
        load_backbone(str(path), pretrained="none")


def test_pretrained_path_is_a_file_source(embedded, images, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(embedded.model.state_dict(), path)
    loaded = load_backbone(EMBEDDED, pretrained=str(path))
    assert loaded.tag == "checkpoint"
    assert torch.equal(loaded.encode_images(images)[0], embedded.encode_images(images)[0])
    with pytest.raises(UsageError, match="does not exist"):
        load_backbone(EMBEDDED, pretrained=str(tmp_path / "other.pt"))


def test_safetensors_file_loads(embedded, images, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in embedded.model.state_dict().items()}, str(path))
    loaded = load_backbone(EMBEDDED, pretrained=str(path))
    assert torch.equal(loaded.encode_images(images)[0], embedded.encode_images(images)[0])


# ----------------------------------------------------------------------------- OpenAI format


def _quick_gelu_source(embedded):
    """The embedded weights in a QuickGELU model, as OpenAI's CLIP is built."""
    with backbone_module.quiet_random_init():
        model = open_clip.create_model(EMBEDDED, pretrained=None, force_quick_gelu=True)
    model.load_state_dict(embedded.model.state_dict())
    return model.eval()


def _uses_quick_gelu(model) -> bool:
    return type(model.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_openai_torchscript_archive_loads_without_torch_jit(
    embedded, images, tmp_path, monkeypatch
):
    source = _quick_gelu_source(embedded)
    path = tmp_path / "openai-style.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script/save are deprecated
        torch.jit.save(torch.jit.script(source.half()), str(path))
    source.float()
    monkeypatch.setattr(torch.jit, "load", _never_called)
    loaded = load_backbone(EMBEDDED, pretrained=str(path))
    assert _uses_quick_gelu(loaded.model) and not _uses_quick_gelu(embedded.model)
    x = torch.stack([loaded.preprocess(Image.fromarray(image)) for image in images])
    with torch.no_grad():
        expected = source.encode_image(x, normalize=True)
    torch.testing.assert_close(loaded.encode_images(images)[0], expected, atol=2e-3, rtol=0)


def test_openai_state_dict_with_meta_entries_builds_quick_gelu(embedded, tmp_path):
    state = dict(embedded.model.state_dict())
    state.update(
        input_resolution=torch.tensor(32),
        context_length=torch.tensor(32),
        vocab_size=torch.tensor(49408),
    )
    path = tmp_path / "openai-state.pt"
    torch.save(state, path)
    assert _uses_quick_gelu(load_backbone(EMBEDDED, pretrained=str(path)).model)


def test_archive_with_a_foreign_global_is_refused(tmp_path):
    import zipfile

    payload = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", payload)
        archive.writestr("evil/constants.pkl", b"\x80\x02).")
    with pytest.raises(UsageError, match=r"os\.system is not allowed"):
        load_backbone(EMBEDDED, pretrained=str(path))
