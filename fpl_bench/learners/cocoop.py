"""CoCoOp (Zhou, Yang, Loy, Liu, "Conditional Prompt Learning for Vision-Language Models",
CVPR 2022, arXiv:2203.05557; reference KaiyangZhou/CoOp `trainers/cocoop.py`).

CoOp's context vectors v_1..v_M plus a lightweight meta-net h_theta that turns each image's
feature x into a token pi = h_theta(x), added to every context vector (Sec. 3.2):

    v_m(x) = v_m + pi,   pi = W2 ReLU(W1 x + b1) + b2,   t_i(x) = {v_1(x), ..., v_M(x), c_i}
    p(y | x) = exp(cos(g(t_y(x)), f(x)) / tau) / sum_i exp(cos(g(t_i(x)), f(x)) / tau)  (Eq. 3)

The meta-net is Linear(D, D/16) -> ReLU -> Linear(D/16, W) (the reference's "linear1 /
relu / linear2", D the image feature width, W the text token width), initialised as
torch.nn.Linear is. Each image thus has its own prompt: the text tower runs one sequence per
image and class. The reference trains with batch 1 for that reason; here the per-sample loss
holds its image's tower forward and vmap batches them, so a step costs one forward of
B x n_cls sequences. Under DP each sample's gradient (of the context and of the meta-net) is
exact by construction: the sample's loss reads no other sample.

The reference feeds the meta-net the L2-normalised image feature (`image_features /
image_features.norm()` before `self.meta_net`); so does this learner.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_bench.learners import LEARNERS
from fpl_bench.learners._base import (
    EncodeContext,
    InitContext,
    Params,
    PromptLearner,
    linear_init,
)

META = ("cocoop.w1", "cocoop.b1", "cocoop.w2", "cocoop.b2")
EVAL_ROWS = 2**13  # token rows per evaluation forward (`CoCoOp.eval_chunk`)


def meta_token(own: Mapping[str, Tensor], images: Tensor) -> Tensor:
    """pi = W2 ReLU(W1 x + b1) + b2 for normalised image features [..., D] -> [..., W]."""
    x = F.normalize(images, dim=-1)
    hidden = F.relu(F.linear(x, own["cocoop.w1"], own["cocoop.b1"]))
    return F.linear(hidden, own["cocoop.w2"], own["cocoop.b2"])


@LEARNERS.register("cocoop")
@dataclass(frozen=True)
class CoCoOp(PromptLearner):
    """Context vectors shifted per image by a meta-net's token."""

    reduction: int  # the meta-net's hidden width is D // reduction (the paper: 16)

    own_params: ClassVar[tuple[str, ...]] = META
    reads_images: ClassVar[bool] = True

    def init_params(self, init: InitContext) -> Params:
        tower = init.tower
        dim = tower.feature_dim
        hidden = max(1, dim // self.reduction)
        w1, b1 = linear_init(dim, hidden, init.generator)
        w2, b2 = linear_init(hidden, tower.width, init.generator)
        return dict(zip(META, (w1, b1, w2, b2), strict=True))

    def encode(self, prompts: Tensor, ctx: EncodeContext) -> Tensor:
        """No tower forward here: the context [N, n_ctx, W] itself (the text features depend
        on the image, so `logits` runs the tower per image)."""
        return prompts

    def logits(
        self,
        text: Tensor,
        images: Tensor,
        tokens: Tensor | None,
        ctx: EncodeContext,
        given: Tensor | None = None,
    ) -> Tensor:
        """Logits [B, n] (or [n] for one image [D]) of Eq. 3, text = the context [1, n_ctx, W]."""
        one = images.dim() == 1
        batch = images.unsqueeze(0) if one else images  # [B, D]
        prompts = text[0] + meta_token(ctx.own, batch)[:, None, :]  # [B, n_ctx, W]
        features = ctx.tower.encode(prompts, ctx.class_idx)  # [B, n, D]
        cos = torch.einsum("bd,bnd->bn", F.normalize(batch, dim=-1), features)
        out = ctx.tower.logit_scale * cos
        return out[0] if one else out

    def eval_chunk(self, text: Tensor, tokens: Tensor | None, ctx: EncodeContext) -> int:
        """Images per chunk: each runs `tower.rows(n)` token rows through the tower; about
        EVAL_ROWS rows per forward (64 images of 32 classes on the embedded tower, 2.5x the
        images per second of 16 on a 2-core CPU; bounded for a large tower and many classes)."""
        return max(1, EVAL_ROWS // ctx.tower.rows(len(ctx.class_idx)))
