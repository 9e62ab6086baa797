"""IVLP, independent vision-language prompting (the deep baseline of Khattak et al., "MaPLe:
Multi-modal Prompt Learning", CVPR 2023, arXiv:2210.03117, and the base that PromptSRC builds
on), and VPT-deep (Jia et al., "Visual Prompt Tuning", ECCV 2022, arXiv:2203.12119) as its
vision-only case; reference muzairkhattak/multimodal-prompt-learning
`trainers/independentVL.py`, `trainers/vpt.py`, `clip/model.py` (ResidualAttentionBlock_IVLP).

Deep prompts in both towers, learned apart (no coupling function), with J_t = text_depth and
J_v = vision_depth blocks (each given on 12 blocks and scaled to its own tower):

    language, block 0         P_0 = the context [n_ctx, W] (the scheme's prompt)
    language, blocks 1..J_t-1 P_i [n_ctx, W] (ivlp.text_deep), each replacing the previous
                              block's outputs at the context positions
    vision,  block 0          V_0 [n_ctx, W_v] (ivlp.vision[0]), appended to the image tokens
    vision,  blocks 1..J_v-1  V_i [n_ctx, W_v] (ivlp.vision[i]), replacing the previous block's
                              prompt outputs
    logits = logit_scale * cos(image feature with V, text feature with P)   (CLIP's)

text_depth = 0 is VPT-deep as the reference's VPT trainer runs it: the text side is CLIP's
hand-written prompt `template` ("a photo of a {}."), frozen, and only the vision prompts learn
(the scheme's context is then carried but unread). text_depth = 1 prompts the text tower at
its input only (CoOp's context).

As in the reference, every prompt is drawn N(0, 0.02^2). The reference appends V_0 before the
image tower's pre-norm; here V_0 is normalised by that norm and appended to the cached tokens
after it, the same thing since the norm acts on each token alone (`fpl_bench/vision.py`). The
reference's vision prompts have a length of their own (N_CTX_VISION); here they have the
context's n_ctx, as MaPLe's (the reference IVLP configs set the two equal: 2 + 2 in MaPLe's
repository, 4 + 4 in PromptSRC's). Depths: 12 of 12 in both towers in MaPLe's repository (its
VPT config: 12), 9 and 9 in PromptSRC's IVLP config; the default here is 9, MaPLe's own depth.
MaPLe is this learner with V_i = F_i(P_i) (`fpl_bench/learners/maple.py`): both are
`fpl_bench/learners/_deep.py`'s `DeepPrompts`, and only `vision_prompts` differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from fpl_bench.learners import LEARNERS
from fpl_bench.learners._base import EncodeContext, InitContext, Params, template_features
from fpl_bench.learners._deep import DeepPrompts, normal_prompts, prompt_depth, vision_tower

OWN = ("ivlp.text_deep", "ivlp.vision")
TEXT = "ivlp_text"  # the hand-written prompt's class features, for text_depth = 0


@LEARNERS.register("ivlp")
@dataclass(frozen=True)
class IVLP(DeepPrompts):
    """Deep language prompts and deep vision prompts, learned independently. The parameters
    are named after the learner (`<name>.text_deep`, `<name>.vision`), so that a learner built
    on IVLP (PromptSRC) owns its own."""

    text_depth: int  # J_t on a 12-block tower (0: the hand-written prompt, VPT-deep)
    vision_depth: int  # J_v on a 12-block tower
    template: str  # the text side's hand-written prompt when text_depth = 0

    own_params: ClassVar[tuple[str, ...]] = OWN

    def init_params(self, init: InitContext) -> Params:
        """ivlp.text_deep [J_t - 1, n_ctx, W] (empty for J_t <= 1), ivlp.vision
        [J_v, n_ctx, W_v]: V_0 and the deep V_1..J_v-1, all N(0, 0.02^2)."""
        tower, vision = init.tower, vision_tower(init, self.name)
        j_text = prompt_depth(self.text_depth, len(tower.transformer.resblocks))
        j_vision = prompt_depth(self.vision_depth, vision.depth)
        n_ctx = tower.n_ctx
        text_deep = normal_prompts(max(j_text - 1, 0), n_ctx, tower.width, init.generator)
        prompts = normal_prompts(j_vision, n_ctx, vision.width, init.generator)
        return dict(zip(self.own_params, (text_deep, prompts), strict=True))

    def constants(self, init: InitContext) -> Params:
        return {TEXT: template_features(init.tower, self.template)} if not self.text_depth else {}

    def text_features(self, context: Tensor, ctx: EncodeContext) -> Tensor:
        """The deep-prompted text features, or the hand-written prompt's (text_depth = 0)."""
        if not self.text_depth:
            return ctx.consts[TEXT][ctx.class_idx]
        return super().text_features(context, ctx)

    def vision_prompts(self, context: Tensor, own: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(V_0 [n_ctx, W_v], V_1..J_v-1 [J_v - 1, n_ctx, W_v]): parameters of their own."""
        prompts = own[f"{self.name}.vision"]
        return prompts[0], prompts[1:]
