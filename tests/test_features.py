"""The image-feature cache: encoded once, reused, keyed by everything that changes features."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fpl_bench.features import cache_key, image_features


@dataclass
class CountingBackbone:
    name: str = "fake"
    tag: str = "t"
    weights_digest: str = "w"
    preprocess_cfg: dict = None
    calls: int = 0

    def encode_images(self, images, with_tokens=True):
        self.calls += 1
        n = len(images)
        pooled = torch.arange(n * 4, dtype=torch.float32).reshape(n, 4)
        return pooled, torch.ones(n, 2, 4)


def test_second_call_hits_the_cache_with_identical_features(tmp_path):
    bb = CountingBackbone(preprocess_cfg={"size": 32})
    images = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    first = image_features(bb, images, data_fingerprint="d", split="train", cache_dir=tmp_path)
    second = image_features(bb, images, data_fingerprint="d", split="train", cache_dir=tmp_path)
    assert bb.calls == 1 and first[2] is False and second[2] is True
    torch.testing.assert_close(first[0], second[0])
    assert second[1].dtype == torch.float16


def test_key_changes_with_backbone_weights_preprocessing_data_and_split():
    base = dict(
        backbone="b", tag="t", weights="w", preprocess={"size": 32}, data="d", split="train"
    )
    keys = {cache_key(**base)}
    for field, value in [
        ("backbone", "b2"),
        ("tag", "t2"),
        ("weights", "w2"),
        ("preprocess", {"size": 224}),
        ("data", "d2"),
        ("split", "test"),
    ]:
        keys.add(cache_key(**{**base, field: value}))
    assert len(keys) == 7


def test_damaged_entry_is_recomputed(tmp_path):
    bb = CountingBackbone(preprocess_cfg={})
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    image_features(bb, images, data_fingerprint="d", split="test", cache_dir=tmp_path)
    for path in (tmp_path / "features").glob("*.pt"):
        path.write_bytes(b"garbage")
    pooled, _, hit = image_features(
        bb, images, data_fingerprint="d", split="test", cache_dir=tmp_path
    )
    assert hit is False and bb.calls == 2 and pooled.shape == (2, 4)


def test_an_entry_whose_tensors_were_altered_is_detected_by_its_hash(tmp_path):
    bb = CountingBackbone(preprocess_cfg={})
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    image_features(bb, images, data_fingerprint="d", split="test", cache_dir=tmp_path)
    (path,) = (tmp_path / "features").glob("*.pt")
    entry = torch.load(path, weights_only=True)
    entry["pooled"][0, 0] = 123.0  # loads fine, but is not what was written
    torch.save(entry, path)
    pooled, _, hit = image_features(
        bb, images, data_fingerprint="d", split="test", cache_dir=tmp_path
    )
    assert hit is False and bb.calls == 2 and float(pooled[0, 0]) == 0.0


def test_two_processes_filling_one_entry_leave_one_valid_file(tmp_path):
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import numpy as np, sys
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        from tests.test_features import CountingBackbone
        from fpl_bench.features import image_features
        bb = CountingBackbone(preprocess_cfg={{}})
        images = np.zeros((64, 8, 8, 3), dtype=np.uint8)
        for _ in range(20):
            image_features(bb, images, data_fingerprint="race", split="t",
                           cache_dir=__import__("pathlib").Path({str(tmp_path)!r}))
        """
    )
    for path in (tmp_path / "features").glob("*"):
        path.unlink()
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    files = list((tmp_path / "features").iterdir())
    assert len(files) == 1  # no temp file left behind
    bb = CountingBackbone(preprocess_cfg={})
    images = np.zeros((64, 8, 8, 3), dtype=np.uint8)
    _, _, hit = image_features(bb, images, data_fingerprint="race", split="t", cache_dir=tmp_path)
    assert hit and bb.calls == 0


def test_image_tower_input_tokens_are_cached_apart_and_equal_the_towers_own(tmp_path, tiny_model):
    from fpl_bench.backbone import load_backbone
    from fpl_bench.features import image_embeddings
    from fpl_bench.vision import VisionTower

    backbone = load_backbone("fpl-tiny-vit", device="cpu")
    images = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    kw = dict(data_fingerprint="d", split="train", cache_dir=tmp_path)
    first, hit1 = image_embeddings(backbone, images, **kw)
    second, hit2 = image_embeddings(backbone, images, **kw)
    assert (hit1, hit2) == (False, True) and first.dtype == torch.float32
    assert torch.equal(first, second) and first.shape == (5, 1 + backbone.n_patches, 64)
    pixels = backbone._to_model_input(images)
    torch.testing.assert_close(first, VisionTower.of(backbone.model).embed(pixels))
    *_, hit = image_features(backbone, images, with_tokens=False, **kw)
    assert hit is False  # a separate entry from the pooled features
