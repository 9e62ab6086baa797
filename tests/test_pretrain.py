"""pretrain-tiny: a two-step run writes an fp16 checkpoint that the loader accepts, seeded."""

import torch

from fpl_bench.backbone import load_backbone
from fpl_bench.pretrain import pretrain_tiny


def test_short_pretraining_writes_a_loadable_seeded_fp16_checkpoint(tmp_path):
    kwargs = dict(
        seed=3, n_images=256, epochs=1, batch_size=128, eval_per_class=1, log=lambda s: None
    )
    result = pretrain_tiny(out=tmp_path / "a.pt", **kwargs)
    pretrain_tiny(out=tmp_path / "b.pt", **kwargs)
    assert result["steps"] == 2
    assert all(0.0 <= acc <= 1.0 for acc in result["zero_shot_accuracy"].values())
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in a.values() if v.is_floating_point())
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same weights
    assert (tmp_path / "a.pt").stat().st_size < 10 * 2**20
    backbone = load_backbone(checkpoint=tmp_path / "a.pt")
    assert backbone.tag == "checkpoint"
