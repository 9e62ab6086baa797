"""Global + local prompts (FedOTP's federation, Li et al., CVPR 2024, arXiv:2403.00041;
reference HongxiaLee/FedOTP `federated_main.py`): each client holds p_global, averaged by the
server (FedAvg, weighted by sample count), and p_local, which never leaves it. Both are handed
to the learner as two prompt components [p_global, p_local]; the `ot` learner matches them to
image patches (FedOTP). With `ctx_init` both start from the phrase; otherwise both are drawn
N(0, 0.02^2), one after the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fpl_bench.learners._base import InitContext, Params, PromptLearner
from fpl_bench.schemes import SCHEMES
from fpl_bench.schemes._base import Scheme


@SCHEMES.register("global_local")
@dataclass(frozen=True)
class GlobalLocal(Scheme):
    """Two prompt components: a shared global one and a personal local one; no options."""

    shared: ClassVar[tuple[str, ...]] = ("p_global",)
    n_prompts: ClassVar[int] = 2

    def init_params(self, init: InitContext, learner: PromptLearner) -> Params:
        # Two draws from the same generator: the prompts differ (unless ctx_init is given).
        return {"p_global": learner.init_prompt(init), "p_local": learner.init_prompt(init)}

    def prompts(self, step: Mapping[str, Tensor], aux: Mapping[str, Tensor]) -> Tensor:
        return torch.stack([step["p_global"], step["p_local"]])  # [2, n_ctx, W]
