"""Deep prompts in both towers: what MaPLe and IVLP / VPT-deep share.

Both learners prompt the first J blocks of the image tower and (IVLP with text_depth >= 1,
MaPLe always) the first J blocks of the text tower; they differ only in where the vision
prompts come from (MaPLe: linear maps of the language prompts; IVLP: parameters of their own).
So a `DeepPrompts` learner supplies `vision_prompts` (and may replace `text_features`), and
this base does the rest:

    language, block 0       P_0 = the context [n_ctx, W] (the scheme's prompt)
    language, blocks 1..J-1 P_i [n_ctx, W] (own parameter "<name>.text_deep"), each replacing
                            the previous block's outputs at the context positions
    vision,  block 0        P~_0 [n, W_v], appended to the image tokens
    vision,  blocks 1..J-1  P~_i [n, W_v], replacing the previous block's prompt outputs
    logits = logit_scale * cos(image feature with P~, text feature with P)

J is given on a 12-block tower (MaPLe's 9) and scaled to the backbone (`prompt_depth`). The
text features depend only on the parameters (one deep text forward per step, through the
encoder's vjp); the image features depend on the image, so the per-sample loss runs the
prompted image tower for its own image (`fpl_bench/vision.py`) and vmap batches those forwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_bench.errors import UsageError
from fpl_bench.learners._base import EncodeContext, InitContext, PromptLearner
from fpl_bench.vision import VisionTower

PROMPT_STD = 0.02  # deep prompts are drawn N(0, 0.02^2) in both references (nn.init.normal_)


def prompt_depth(depth: int, layers: int) -> int:
    """J for an L-block tower from a depth on 12 blocks: round(depth * L / 12), at least 1;
    a depth of 0 (no prompt in that tower) stays 0."""
    return max(1, round(depth * layers / 12)) if depth > 0 else 0


def normal_prompts(count: int, n: int, width: int, generator: torch.Generator) -> Tensor:
    """`count` prompts [count, n, width] drawn N(0, 0.02^2) (count may be 0)."""
    return PROMPT_STD * torch.randn(count, n, width, generator=generator)


def vision_tower(ctx: EncodeContext | InitContext, learner: str) -> VisionTower:
    """The run's image tower, which a learner that prompts it needs."""
    if ctx.vision is None:
        raise UsageError(f"{learner} prompts the image tower, but the run has none (a bug)")
    return ctx.vision


class DeepPrompts(PromptLearner):
    """Prompts in the first blocks of the image tower (and of the text tower); see the module
    docstring. A subclass gives `vision_prompts` and its own parameters."""

    reads_images: ClassVar[bool] = True
    prompts_image_tower: ClassVar[bool] = True

    def vision_prompts(self, context: Tensor, own: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(P~_0 [n, W_v], P~_1..J-1 [J-1, n, W_v]) from the context [n_ctx, W]."""
        raise NotImplementedError

    def text_features(self, context: Tensor, ctx: EncodeContext) -> Tensor:
        """Class text features [n, D] (normalised): the context at the input and the deep
        language prompts `<name>.text_deep` at the input of blocks 1..J-1."""
        return ctx.tower.encode_deep(context, ctx.own[f"{self.name}.text_deep"], ctx.class_idx)

    def encode(self, prompts: Tensor, ctx: EncodeContext) -> dict[str, Tensor]:  # type: ignore[override]
        """{"text": [1, n, D] with the deep language prompts, "first": P~_0, "deep": P~_i}."""
        context = prompts[0]
        text = self.text_features(context, ctx)
        first, deep = self.vision_prompts(context, ctx.own)
        return {"text": text.unsqueeze(0), "first": first, "deep": deep}

    def logits(  # type: ignore[override]
        self,
        text: dict[str, Tensor],
        images: Tensor,
        tokens: Tensor | None,
        ctx: EncodeContext,
        given: Tensor | None = None,
    ) -> Tensor:
        """Logits [B, n] (or [n] for one image) from the cached image tokens [B, T, W_v]."""
        assert tokens is not None, f"{self.name} reads the image tower's cached tokens"
        one = tokens.dim() == 2
        batch = tokens.unsqueeze(0) if one else tokens
        out = ctx.tower.logit_scale * self.image_features_with(text, batch, ctx) @ text["text"][0].T
        return out[0] if one else out

    def image_features_with(
        self, text: dict[str, Tensor], tokens: Tensor, ctx: EncodeContext
    ) -> Tensor:
        """Normalised image features [B, D] of the cached tokens [B, T, W_v] with the vision
        prompts of `encode`'s output (PromptSRC also compares them with the frozen ones)."""
        features = vision_tower(ctx, self.name).run(tokens, text["first"], text["deep"])
        return F.normalize(features, dim=-1)

    def eval_chunk(self, text: Tensor, tokens: Tensor | None, ctx: EncodeContext) -> int:
        return 256
