"""MaPLe (Khattak, Rasheed, Maaz, Khan, Khan, "MaPLe: Multi-modal Prompt Learning", CVPR 2023,
arXiv:2210.03117; reference muzairkhattak/multimodal-prompt-learning `trainers/maple.py`,
`clip/model.py`).

Prompts in both towers, the vision ones coupled to the language ones (Sec. 3.3):

    language, block 0       P_0 = the context [n_ctx, W] (the scheme's prompt)
    language, blocks 1..J-1 P_i [n_ctx, W], learned; each replaces the previous block's
                            outputs at the context positions (Eq. 3-4)
    vision,  block 0        P~_0 = F_0(P_0), appended to the image tokens (Eq. 5)
    vision,  blocks 1..J-1  P~_i = F_i(P_i), replacing the previous block's prompt outputs
                            (Eq. 6); F_i are linear maps W -> W_v (the coupling functions)

logits = logit_scale * cos(image feature with P~, text feature with P) (Eq. 7, CLIP's). J is
9 of ViT-B/16's 12 blocks in the paper; here `depth` of 12 scaled to the backbone:
J = round(depth * L / 12) for an L-block tower (3 of the embedded tower's 4).

The reference makes F_1..F_{J-1} copies of one initial linear layer (`_get_clones`) and F_0 a
separate one, both torch.nn.Linear's initialisation, and draws P_1..P_{J-1} from N(0, 0.02^2);
so does this learner. MaPLe is IVLP (`fpl_bench/learners/ivlp.py`) with the vision prompts
computed by F_i instead of learned apart: the deep forwards of both towers, the logits and the
depth scaling are `fpl_bench/learners/_deep.py`'s, and only `vision_prompts` is MaPLe's own.
The image tower's input tokens (patch embedding, class token, positions, pre-norm) are frozen
and cached (`fpl_bench/vision.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_bench.learners import LEARNERS
from fpl_bench.learners._base import InitContext, Params, linear_init
from fpl_bench.learners._deep import DeepPrompts, normal_prompts, prompt_depth, vision_tower

__all__ = ["OWN", "MaPLe", "prompt_depth"]

OWN = ("maple.text_deep", "maple.w0", "maple.b0", "maple.w_deep", "maple.b_deep")


@LEARNERS.register("maple")
@dataclass(frozen=True)
class MaPLe(DeepPrompts):
    """Deep language prompts coupled to deep vision prompts by linear maps."""

    depth: int  # J on a 12-block tower (the paper's 9), scaled to the backbone's depth

    own_params: ClassVar[tuple[str, ...]] = OWN

    def init_params(self, init: InitContext) -> Params:
        tower, vision = init.tower, vision_tower(init, self.name)
        layers = min(len(tower.transformer.resblocks), vision.depth)
        j = prompt_depth(self.depth, layers)
        width, width_v, n_ctx = tower.width, vision.width, tower.n_ctx
        text_deep = normal_prompts(j - 1, n_ctx, width, init.generator)
        w0, b0 = linear_init(width, width_v, init.generator)
        w, b = linear_init(width, width_v, init.generator)  # F_1..F_{J-1}: copies of one layer
        w_deep = w.expand(j - 1, *w.shape).clone()
        b_deep = b.expand(j - 1, *b.shape).clone()
        return dict(zip(OWN, (text_deep, w0, b0, w_deep, b_deep), strict=True))

    def vision_prompts(self, context: Tensor, own: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(P~_0 [n_ctx, W_v], P~_1..J-1 [J-1, n_ctx, W_v]) by the coupling functions F_i."""
        first = F.linear(context, own["maple.w0"], own["maple.b0"])
        deep = torch.einsum("jnw,jvw->jnv", own["maple.text_deep"], own["maple.w_deep"])
        return first, deep + own["maple.b_deep"][:, None, :]
