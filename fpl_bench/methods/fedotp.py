"""FedOTP (Li et al., "Global and Local Prompts Cooperation via Optimal Transport for Federated
Learning", CVPR 2024, arXiv:2403.00041; reference HongxiaLee/FedOTP `trainers/GLP_OT.py`, with
the round in `federated_main.py`, `--model FedOTP --trainer GLP_OT --OT COT`).

Each client holds two prompts [n_ctx, W]: p_global, averaged by the server (FedAvg, weighted by
sample count), and p_local, which never leaves the client. For class c their text features
t_{1,c}, t_{2,c} (one tower forward for both) are matched to the M patch tokens x_m of the image
by unbalanced optimal transport (`fpl_bench.ot.sinkhorn`):

    S_{m n} = cos(x_m, t_{n,c})                       similarity [M, 2]
    T = Sinkhorn(C = 1 - S; eps, top_percent)         T^T 1 = top_percent / 2,  T 1 <= 1 / M
    logit_c = logit_scale * sum_{m, n} T_{m n} S_{m n}

so each prompt attends to the (top_percent of the) patches it matches best. T is computed
without gradient, as in the reference (`torch.no_grad()` around the Sinkhorn loop); the
gradient reaches the prompts through S. Under DP both prompts get DP-SGD noise on the client.
Hand values (tests/methods/test_fedotp.py): identical prompts with top_percent = 1 give
logit_c = logit_scale * mean_m cos(x_m, t_c); identical patches x give
logit_c = top_percent * logit_scale * (cos(x, t_{1,c}) + cos(x, t_{2,c})) / 2.

Departures from the reference:
- Sinkhorn (tests/test_ot.py): each (image, class) problem stops on its own rule
  (mean |v - v_prev| < thresh) rather than the whole batch on the batch mean, so an image's
  logits do not depend on the other images of its batch (batched equals one by one, and each
  plan equals the reference's loop run on that problem alone); it runs vectorised with no host
  sync per iteration and works under `torch.func.vmap` (per-sample DP gradients); the kernel is
  column-rescaled (same iterates, no underflow for small eps); no `None` return on NaN.
- Patch tokens are the frozen, cached, projected and L2-normalised tokens after `ln_post`
  (as the reference's `ModifiedVisionTransformer` returns them), so there is no per-step image
  augmentation; the pooled image feature is not used, as in the reference.
- Defaults: top_percent 0.8 and eps 0.1 (DESIGN.md). The reference's command-line defaults are
  top_percent 1, eps 0.1; its few-shot script uses top_percent 0.8, eps 0.01.
- With `ctx_init` both prompts start from the phrase (the reference's N-prompt learner cannot
  take ctx_init); otherwise both are drawn N(0, 0.02^2), one after the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

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
from fpl_bench.ot import sinkhorn

# Evaluation may end the Sinkhorn loop early, checking every this many iterations whether all
# problems have converged (same result; never inside vmap/grad, where the loop runs max_iter).
_CHECK_EVERY = 5


@register_method("fedotp")
@dataclass(frozen=True)
class FedOTP(PromptMethod):
    """Global + local prompt, matched to the image's patch tokens by unbalanced OT."""

    eps: float = 0.1  # lambda, entropic regularisation of the Sinkhorn distance
    top_percent: float = 0.8  # mass transported from the patch side, in (0, 1]
    max_iter: int = 100  # Sinkhorn iterations at most
    thresh: float = 1e-3  # stop once mean |v - v_prev| < thresh

    shared: ClassVar[tuple[str, ...]] = ("p_global",)
    sync: ClassVar[Literal["round", "step"]] = "round"
    privacy: ClassVar[Placement] = Placement(client=("p_global", "p_local"))
    needs_tokens: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise UsageError(f"fedotp: eps must be > 0, got {self.eps}")
        if not 0 < self.top_percent <= 1:
            raise UsageError(f"fedotp: top_percent must be in (0, 1], got {self.top_percent}")
        if self.max_iter < 1:
            raise UsageError(f"fedotp: max_iter must be >= 1, got {self.max_iter}")
        if not self.thresh > 0:
            raise UsageError(f"fedotp: thresh must be > 0, got {self.thresh}")

    def init_params(self, ctx: InitContext) -> Params:
        # Two draws from the same generator: the prompts differ (unless ctx_init is given).
        return {"p_global": random_context(ctx), "p_local": random_context(ctx)}  # [n_ctx, W]

    def encode(
        self, step: Mapping[str, Tensor], aux: Mapping[str, Tensor], ctx: EncodeContext
    ) -> Any:
        prompts = torch.stack([step["p_global"], step["p_local"]])  # [2, n_ctx, W]
        return ctx.tower.encode(prompts, ctx.class_idx)  # [2, n, D]

    def logits(
        self, encoded: Any, images: Tensor, tokens: Tensor | None, ctx: EncodeContext
    ) -> Tensor:
        """OT logits [B, n] (or [n] for one image) from patch tokens [B, P, D] (or [P, D]).

        `encoded` [2, n, D] are the prompts' text features; `images` (pooled) are not used.
        """
        if tokens is None:
            raise ValueError("fedotp scores patch tokens: call logits with tokens [B, P, D]")
        patches = F.normalize(tokens, dim=-1)  # [*, P, D]
        sim = torch.einsum("...md,ncd->...cmn", patches, encoded)  # [*, n, P, 2]
        plan = sinkhorn(
            1.0 - sim,
            eps=self.eps,
            top_percent=self.top_percent,
            max_iter=self.max_iter,
            thresh=self.thresh,
            check_every=_CHECK_EVERY,
        )  # [*, n, P, 2], no gradient
        return ctx.tower.logit_scale * (plan * sim).sum(dim=(-2, -1))  # [*, n]
