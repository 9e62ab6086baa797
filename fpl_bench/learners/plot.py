"""PLOT (Chen, Yao, Song, Li, Rao, Zhang, "PLOT: Prompt Learning with Optimal Transport for
Vision-Language Models", ICLR 2023, arXiv:2210.01253; reference CHENGY12/PLOT
`plot-coop/trainers/plot.py`, `CustomCLIP`; federated in 0-ml/flip `flcore/models/clip/PLOT.py`).

N prompts for one client (the paper's N = 4), each CoOp's context before every class name,
give class c the text features t_{1,c} .. t_{N,c}; the image gives M local features x_m (its
patch tokens). Balanced entropic optimal transport (Sec. 3) matches the two sets, with
uniform marginals and the cost 1 - cosine:

    S_mn = cos(x_m, t_{n,c})                          similarity [M, N]
    T = Sinkhorn(C = 1 - S; eps)                      T 1 = 1 / M,  T^T 1 = 1 / N
    logit_c = logit_scale * sum_{m, n} T_mn S_mn      (= logit_scale (1 - d_OT(c)))

and the loss is cross-entropy on these logits, T held fixed (the paper's inner loop; the
reference computes it under `torch.no_grad()`). This is FedOTP's scoring
(`fpl_bench.learners.ot`) with the transport balanced: the learner is the `ot` learner whose
prompts 1..N-1 are its own parameters (`plot.prompts` [N - 1, n_ctx, W]), and prompt 0 is the
scheme's (`local`: PLOT alone on each client; `fedavg`: federated PLOT, as 0-ml/flip runs it,
sharing all N); `encode` runs the N prompts through the tower in one forward, and the logits,
prediction and per-sample plans are the `ot` learner's. Hand values (tests/test_plot.py):
identical prompts give logit_c = logit_scale * mean_m cos(x_m, t_c); identical patches give
logit_c = logit_scale * mean_n cos(x, t_{n,c}).

As the reference: eps = 0.1, at most 100 iterations, logit_scale = CLIP's, prompts drawn
N(0, 0.02^2); the pooled image feature is not scored (its logits are computed and dropped).
Departures:
- the local features are the frozen, cached, projected and normalised patch tokens of the
  image tower (FedOTP's; the reference's ResNet-50 gives its attention-pooled 7 x 7 map);
- the Sinkhorn iterates are the reference's (`fpl_bench.ot`, balanced), but each problem stops
  on its own rule, mean_n |v_n - v_prev,n| < thresh on the prompt-side scaling (the shared
  solver's) rather than the batch's mean_m |u_m - u_prev,m| < 1e-2 on the patch side; at
  thresh 1e-3 it stops within a few iterations of the reference's rule (3-8 at CLIP-like
  costs) and sum T S is as close to the converged plan's (within 1e-4, tests/test_plot.py);
- with `ctx_init` prompt 0 starts from the phrase (the reference cannot take it with N > 1) and
  prompts 1..N-1 are drawn as without it: N copies of one phrase would stay equal, their
  gradients being equal;
- top_percent < 1 (not PLOT's) transports that much mass as FedOTP's partial OT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fpl_bench.learners import LEARNERS
from fpl_bench.learners._base import EncodeContext, InitContext, Params
from fpl_bench.learners.ot import OTPatch

PROMPTS = "plot.prompts"  # the learner's own prompts 1..N-1 [N - 1, n_ctx, W]
PROMPT_STD = 0.02  # the reference's nn.init.normal_(ctx_vectors, std=0.02)


@LEARNERS.register("plot")
@dataclass(frozen=True)
class PLOT(OTPatch):
    """N prompts (the scheme's and N - 1 of its own) matched to patch tokens by balanced OT."""

    n_prompts: int  # N, the paper's 4

    own_params: ClassVar[tuple[str, ...]] = (PROMPTS,)
    adds_prompts: ClassVar[bool] = True

    def relative_cost(self) -> float:
        """N prompts through the text tower (its backward under DP) instead of one."""
        return float(self.n_prompts)

    @property
    def balanced(self) -> bool:
        """PLOT's transport is balanced; below full mass it is FedOTP's partial transport."""
        return self.top_percent == 1.0

    def init_params(self, init: InitContext) -> Params:
        tower = init.tower
        shape = (self.n_prompts - 1, tower.n_ctx, tower.width)
        return {PROMPTS: PROMPT_STD * torch.randn(shape, generator=init.generator)}

    def encode(self, prompts: Tensor, ctx: EncodeContext) -> Tensor:
        """Text features [S + N - 1, n, D] of the scheme's prompt components [S, n_ctx, W]
        followed by the learner's own N - 1, in one tower forward."""
        return super().encode(torch.cat([prompts, ctx.own[PROMPTS]]), ctx)
