"""Local training only: each client learns its own prompt on its own data and never
communicates (CoOp as a federated baseline, Zhou et al. IJCV 2022: the personalization-only
row). Under DP the prompt gets DP-SGD noise on the client (it is released as the client's
personalized prompt).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from fpl_bench.learners._base import InitContext, Params, PromptLearner
from fpl_bench.schemes import SCHEMES
from fpl_bench.schemes._base import Scheme


@SCHEMES.register("local")
@dataclass(frozen=True)
class Local(Scheme):
    """One prompt per client, never shared; no options."""

    federates: ClassVar[bool] = False

    def init_params(self, init: InitContext, learner: PromptLearner) -> Params:
        return {"prompt": learner.init_prompt(init)}  # [n_ctx, W]

    def prompts(self, step: Mapping[str, Tensor], aux: Mapping[str, Tensor]) -> Tensor:
        return step["prompt"].unsqueeze(0)  # [1, n_ctx, W]
