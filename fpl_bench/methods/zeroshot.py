"""Zero-shot CLIP (Radford et al., ICML 2021, arXiv:2103.00020): the no-training row.

Every client scores classes with the hand-written prompt "a photo of a {}."; there are no
parameters, so nothing is trained, uploaded or privatized.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from fpl_bench.methods.base import EncodeContext, InitContext, Params, PromptMethod
from fpl_bench.methods.registry import register_method


@register_method("zeroshot", aliases=("zero_shot", "clip"))
@dataclass(frozen=True)
class ZeroShot(PromptMethod):
    """Hand-crafted prompt, no training."""

    template: str = "a photo of a {}."
    trains: ClassVar[bool] = False

    def init_params(self, ctx: InitContext) -> Params:
        return {}

    def constants(self, ctx: InitContext) -> Params:
        names = ctx.tower.classnames
        return {"text_features": ctx.tower.encode_text([self.template.format(n) for n in names])}

    def encode(
        self, step: Mapping[str, Tensor], aux: Mapping[str, Tensor], ctx: EncodeContext
    ) -> Any:
        return ctx.consts["text_features"][ctx.class_idx]  # [n, D]
