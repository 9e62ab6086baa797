"""Zero-shot CLIP (Radford et al., ICML 2021, arXiv:2103.00020): the no-training row.

Every client scores classes with the hand-written prompt "a photo of a {}."; the learner has
nothing to train, so the driver runs only its evaluation. It pairs with the `local` scheme.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from fpl_bench.learners import LEARNERS
from fpl_bench.learners._base import EncodeContext, InitContext, Params, PromptLearner


@LEARNERS.register("zeroshot")
@dataclass(frozen=True)
class ZeroShot(PromptLearner):
    """Hand-crafted prompt, no training."""

    template: str

    trains: ClassVar[bool] = False

    def constants(self, init: InitContext) -> Params:
        names = init.tower.classnames
        return {"zeroshot_text": init.tower.encode_text([self.template.format(n) for n in names])}

    def encode(self, prompts: Tensor, ctx: EncodeContext) -> Tensor:
        return ctx.consts["zeroshot_text"][ctx.class_idx].unsqueeze(0)  # [1, n, D]
