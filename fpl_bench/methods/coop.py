"""CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022,
arXiv:2109.01134; reference KaiyangZhou/CoOp `trainers/coop.py`) as a federated baseline.

Each client learns its own context vectors p_i [n_ctx, W] on its own data and never
communicates: the personalization-only baseline. Under DP, p_i gets DP-SGD noise on the client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from fpl_bench.methods.base import InitContext, Params, Placement, PromptMethod, random_context
from fpl_bench.methods.registry import register_method


@register_method("coop")
@dataclass(frozen=True)
class CoOp(PromptMethod):
    """One prompt per client, trained locally, never shared."""

    privacy: ClassVar[Placement] = Placement(client=("prompt",))

    def init_params(self, ctx: InitContext) -> Params:
        return {"prompt": random_context(ctx)}  # [n_ctx, W]

    def prompt_of(self, step: Mapping[str, Tensor], aux: Mapping[str, Tensor]) -> Tensor:
        return step["prompt"]
