"""KgCoOp (Yao, Zhang, Xu, "Visual-Language Prompt Tuning with Knowledge-guided Context
Optimization", CVPR 2023, arXiv:2303.13283; reference htyao89/KgCoOp `trainers/kgcoop.py`).

CoOp's context vectors plus a knowledge-guided prior that keeps the learned class text
features w_c near the hand-crafted CLIP features w_clip_c of "a photo of a {class}." (Eq. 5-6):

    L = CE + lambda * (1 / N_c) * sum_c || w_c - w_clip_c ||^2,     lambda = 8

w and w_clip are L2-normalised, so ||w - w_clip||^2 = 2 (1 - cos(w, w_clip)); the reference
code writes the term as lambda * (1 - mean_c cos), half of the paper's. We follow the paper's
equation. The prior touches no training image: it is applied outside per-sample clipping and
gets no DP noise (fpl_bench/learners/_base.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fpl_bench.learners import LEARNERS
from fpl_bench.learners._base import EncodeContext, InitContext, Params, PromptLearner


@LEARNERS.register("kgcoop")
@dataclass(frozen=True)
class KgCoOp(PromptLearner):
    """Context vectors kept near CLIP's hand-crafted class features."""

    lam: float  # lambda in the paper
    template: str  # the hand-crafted prompt whose features anchor the learned ones

    def constants(self, init: InitContext) -> Params:
        names = init.tower.classnames
        texts = [self.template.format(name) for name in names]
        return {"kgcoop_clip_text": init.tower.encode_text(texts)}  # [n_cls, D]

    def prior_loss(self, text: Tensor, ctx: EncodeContext) -> Tensor | None:
        """lambda * mean_c ||w_c - w_clip_c||^2 over the scored classes (text [1, n, D])."""
        w_clip = ctx.consts["kgcoop_clip_text"][ctx.class_idx]  # [n, D]
        return self.lam * (text[0] - w_clip).pow(2).sum(-1).mean()
