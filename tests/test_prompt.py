"""The prompt learner: EOT truncation is exact, shapes, phrase init, zero-shot path."""

import torch
import torch.nn.functional as F

from fpl_bench.text_tower import TextTower

# float32 rounding, in units of its epsilon (the vector unit orders the sums differently; measured
# within 2 eps on AVX-512, AVX2 and default), used as rtol and atol
F32 = 32 * torch.finfo(torch.float32).eps


def test_truncated_features_equal_untruncated(tiny_model):
    model, tokenizer = tiny_model
    names = ["red circle", "dark blue square", "green triangle"]
    cut = TextTower.build(model, tokenizer, names, n_ctx=4, truncate=True)
    full = TextTower.build(model, tokenizer, names, n_ctx=4, truncate=False)
    assert cut.seq_len < full.seq_len == 32
    ctx = 0.02 * torch.randn(4, cut.width, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(cut.encode(ctx), full.encode(ctx), rtol=F32, atol=F32)


def test_encode_matches_open_clip_encode_text_for_a_written_prompt(tiny_model):
    """Splicing the embeddings of real words as context reproduces CLIP's own encode_text."""
    model, tokenizer = tiny_model
    tower = TextTower.build(model, tokenizer, ["red circle", "blue square"], n_ctx=4)
    ctx = tower.embed_phrase("a photo of a")  # 4 tokens
    ours = tower.encode(ctx)
    theirs = F.normalize(
        model.encode_text(tokenizer(["a photo of a red circle.", "a photo of a blue square."])),
        dim=-1,
    )
    torch.testing.assert_close(ours, theirs, rtol=F32, atol=F32)
    torch.testing.assert_close(
        tower.encode_text(["a photo of a red circle."]), theirs[:1], rtol=F32, atol=F32
    )


def test_encode_batches_leading_dims_and_class_subsets(tiny_tower):
    ctx = torch.randn(3, tiny_tower.n_ctx, tiny_tower.width)
    feats = tiny_tower.encode(ctx)  # [3, n_cls, D]
    assert feats.shape[:2] == (3, tiny_tower.n_classes)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3, tiny_tower.n_classes))
    sub = tiny_tower.encode(ctx[1], torch.tensor([4, 0]))
    torch.testing.assert_close(sub, feats[1, [4, 0]], rtol=F32, atol=F32)
