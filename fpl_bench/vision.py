"""The frozen image tower split where image-side prompts enter it.

A learner that prompts the image tower (MaPLe, IVLP / VPT-deep) changes everything above the
first prompted block, so what can be cached per image is what lies below: the patch embedding,
the class token, the positional embedding and the pre-norm (`VisionTower.embed`: open_clip's
`VisionTransformer._embeds`). `VisionTower.run` takes those cached tokens, appends the prompt
tokens (normalised by the same pre-norm, which acts on each token alone, so appending after it
equals appending before it as the MaPLe reference does), replaces them at the input of each
deeper prompted block, and pools and projects as the model does, without the prompt tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fpl_bench.errors import UsageError


@dataclass(eq=False)
class VisionTower:
    """An open_clip `VisionTransformer` (frozen), run from its cached input tokens."""

    visual: nn.Module

    @classmethod
    def of(cls, model: nn.Module) -> VisionTower:
        visual = getattr(model, "visual", None)
        needed = ("_embeds", "transformer", "_pool", "ln_pre")
        if visual is None or not all(hasattr(visual, name) for name in needed):
            kind = type(visual).__name__ if visual is not None else "none"
            raise UsageError(
                f"the backbone's image tower ({kind}) is not an open_clip VisionTransformer; "
                "image-side prompts need a ViT backbone (e.g. ViT-B-16 or the embedded one)"
            )
        return cls(visual)

    @property
    def width(self) -> int:
        """Width of the image tower's tokens (that of a vision prompt token)."""
        return int(self.visual.class_embedding.shape[-1])

    @property
    def depth(self) -> int:
        return len(self.visual.transformer.resblocks)

    @torch.no_grad()
    def embed(self, pixels: Tensor) -> Tensor:
        """The cached part: tokens [N, 1 + P, width] below the first block."""
        return self.visual._embeds(pixels)

    def run(self, tokens: Tensor, first: Tensor, deeper: Tensor) -> Tensor:
        """Image features [B, D] (not normalised) of cached tokens [B, T, width] with prompt
        tokens `first` [n, width] appended at the input and replaced by `deeper[i - 1]`
        [n, width] at the input of block i = 1 .. len(deeper). Attention runs on its math
        kernel (its backward batches under vmap: one forward per sample under DP)."""
        visual, n = self.visual, first.shape[0]
        batch = tokens.shape[0]
        x = torch.cat([tokens, visual.ln_pre(first).expand(batch, n, first.shape[-1])], dim=1)
        first_dim = getattr(visual.transformer, "batch_first", True)
        with sdpa_kernel([SDPBackend.MATH]):
            for i, block in enumerate(visual.transformer.resblocks):
                if 1 <= i <= deeper.shape[0]:
                    x = torch.cat([x[:, :-n], deeper[i - 1].expand(batch, n, x.shape[-1])], dim=1)
                x = block(x if first_dim else x.transpose(0, 1))
                x = x if first_dim else x.transpose(0, 1)
        pooled, _ = visual._pool(x[:, :-n])
        return pooled @ visual.proj if visual.proj is not None else pooled
