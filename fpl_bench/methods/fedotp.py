"""FedOTP (Li et al., "Global and Local Prompts Cooperation via Optimal Transport for Federated
Learning", CVPR 2024, arXiv:2403.00041; reference HongxiaLee/FedOTP `trainers/GLP_OT.py`).

Each client holds a global prompt (FedAvg) and a local prompt (kept). The two prompts' text
features of class c, t_{1,c} and t_{2,c}, are matched to the image's M patch tokens x_m by the
partial transport plan T of `fpl_bench.ot.partial_sinkhorn` (cost 1 - cos, eps 0.1, thresh
1e-3, at most 100 iterations, top_percent 0.8), and

    logit_c = logit_scale * sum_{m, n} T_{m n} cos(x_m, t_{n, c})

T is computed without gradient, as in the reference; the gradient flows through the cosines.
Departures: the Sinkhorn loop is vectorised over images x classes with per-problem freezing
instead of a host sync per iteration; the patch tokens are cached with the pooled features.
Under DP both prompts get client-side DP-SGD noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_bench.errors import UsageError
from fpl_bench.methods.base import (
    EncodeContext,
    InitContext,
    Params,
    Placement,
    PromptMethod,
    random_context,
)
from fpl_bench.methods.registry import register_method
from fpl_bench.ot import partial_sinkhorn


@register_method("fedotp")
@dataclass(frozen=True)
class FedOTP(PromptMethod):
    """Global + local prompt matched to patch tokens by unbalanced OT."""

    eps: float = 0.1  # entropic regularisation
    top_percent: float = 0.8  # transported mass (rho)
    max_iter: int = 100
    thresh: float = 1e-3

    shared: ClassVar[tuple[str, ...]] = ("p_global",)
    privacy: ClassVar[Placement] = Placement(client=("p_global", "p_local"))
    needs_tokens: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.eps <= 0 or not 0 < self.top_percent <= 1 or self.max_iter < 1 or self.thresh <= 0:
            raise UsageError(
                "fedotp needs eps > 0, 0 < top_percent <= 1, max_iter >= 1, thresh > 0"
            )

    def init_params(self, ctx: InitContext) -> Params:
        return {"p_global": random_context(ctx), "p_local": random_context(ctx)}  # [n_ctx, W] each

    def encode(
        self, step: Mapping[str, Tensor], aux: Mapping[str, Tensor], ctx: EncodeContext
    ) -> Any:
        prompts = torch.stack([step["p_global"], step["p_local"]])  # [2, n_ctx, W]
        return ctx.tower.encode(prompts, ctx.class_idx)  # [2, n, D]

    def _ot_logits(
        self, text: Tensor, tokens: Tensor, logit_scale: float, check_every: int
    ) -> Tensor:
        """text [N, n, D], tokens [..., M, D] -> logits [..., n]."""
        tokens = F.normalize(tokens, dim=-1)
        sim = torch.einsum("...md,ncd->...cmn", tokens, text)  # [..., n, M, N]
        plan = partial_sinkhorn(
            1.0 - sim,
            eps=self.eps,
            top_percent=self.top_percent,
            max_iter=self.max_iter,
            thresh=self.thresh,
            check_every=check_every,
        )
        return logit_scale * (plan * sim).sum(dim=(-1, -2))

    def logits(
        self, encoded: Any, images: Tensor, tokens: Tensor | None, ctx: EncodeContext
    ) -> Tensor:
        assert tokens is not None, "fedotp needs patch tokens"
        return self._ot_logits(encoded, tokens, ctx.tower.logit_scale, check_every=10)

    def sample_loss(
        self, encoded: Any, image: Tensor, tokens: Tensor, label: Tensor, ctx: EncodeContext
    ) -> Tensor:
        logits = self._ot_logits(encoded, tokens, ctx.tower.logit_scale, check_every=0)  # [n]
        return F.cross_entropy(logits.unsqueeze(0), label.unsqueeze(0))
