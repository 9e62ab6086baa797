"""FedOTP (Li et al., "Global and Local Prompts Cooperation via Optimal Transport for Federated
Learning", CVPR 2024, arXiv:2403.00041; reference HongxiaLee/FedOTP `trainers/GLP_OT.py`, with
the round in `federated_main.py`, `--model FedOTP --trainer GLP_OT --OT COT`).

The OT learner scores the N prompt components a scheme hands it (FedOTP: the `global_local`
scheme's p_global, averaged by the server, and p_local, kept by the client). For class c their
text features t_{1,c} .. t_{N,c} (one tower forward for all) are matched to the M patch tokens
x_m of the image by unbalanced optimal transport (`fpl_bench.ot.sinkhorn`):

    S_{m n} = cos(x_m, t_{n,c})                       similarity [M, N]
    T = Sinkhorn(C = 1 - S; eps, top_percent)         T^T 1 = top_percent / N,  T 1 <= 1 / M
    logit_c = logit_scale * sum_{m, n} T_{m n} S_{m n}

so each prompt attends to the (top_percent of the) patches it matches best. T is computed
without gradient, as in the reference (`torch.no_grad()` around the Sinkhorn loop); the
gradient reaches the prompts through S. Hand values (tests/methods/test_fedotp.py): identical prompts with top_percent = 1 give
logit_c = logit_scale * mean_m cos(x_m, t_c); identical patches x give
logit_c = top_percent * logit_scale * (cos(x, t_{1,c}) + cos(x, t_{2,c})) / 2.

Departures from the reference:
- Sinkhorn (tests/test_ot.py): each (image, class) problem stops on its own rule
  (mean |v - v_prev| < thresh) rather than the whole batch on the batch mean, so an image's
  logits do not depend on the other images of its batch (batched equals one by one, and each
  plan equals the reference's loop run on that problem alone); it runs vectorised over all
  problems and works under `torch.func.vmap` (per-sample DP gradients); it iterates the
  reference's scalings where they stay in float range (every problem at eps >= 0.06) and the
  same iterates in the log domain elsewhere (finite plans in float32 for eps down to 0.005,
  tests/test_ot.py against POT); no `None` return on NaN.
- Patch tokens are the frozen, cached, projected and L2-normalised tokens after `ln_post`
  (as the reference's `ModifiedVisionTransformer` returns them), so there is no per-step image
  augmentation; the pooled image feature is not used, as in the reference.
- Defaults: top_percent 0.8 and eps 0.1 (docs/design.md, "Methods"). The reference's
  command-line defaults are top_percent 1, eps 0.1; its few-shot script uses top_percent 0.8,
  eps 0.01.
- With `ctx_init` both prompts start from the phrase (the reference's N-prompt learner cannot
  take ctx_init); otherwise both are drawn N(0, 0.02^2), one after the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_bench.compute import wide
from fpl_bench.learners import LEARNERS
from fpl_bench.learners._base import EncodeContext, PromptLearner
from fpl_bench.ot import sinkhorn

# Sinkhorn checks every this many iterations which problems have stopped and iterates only the
# others (same result; never inside vmap/grad, where the loop runs max_iter): the fastest of
# 1 to 8 on CPU at FedOTP's sizes (benchmarks/fedotp_eval.py).
_CHECK_EVERY = 5

# Evaluation's chunk (`eval_chunk`): this many similarity entries (16 MB in float32); a Sinkhorn
# iteration costs ~3x more per problem on 128 problems than on 2000+.
_EVAL_ELEMENTS = 1 << 22

# `predict_chunk` solves every class of a chunk in one Sinkhorn call unless solving each
# image's first class before the others may rule out this fraction of the chunk's problems: the
# extra, small call costs about a quarter of a chunk's solve on CPU (benchmarks/fedotp_eval.py).
_MIN_RULED_OUT = 0.25

# `predict_chunk` skips a class whose logit bound, raised by this fraction of the largest
# possible |logit|, is below a solved logit: 1e3 times float32 rounding of a 128-term sum (at
# least 256 units of rounding of the similarities' dtype: in bf16 nothing is skipped).
_BOUND_SLACK = 1e-3


@LEARNERS.register("ot")
@dataclass(frozen=True)
class OTPatch(PromptLearner):
    """Prompt components matched to the image's patch tokens by unbalanced OT."""

    eps: float  # lambda, entropic regularisation of the Sinkhorn distance
    top_percent: float  # mass transported from the patch side, in (0, 1]
    max_iter: int  # Sinkhorn iterations at most
    thresh: float  # stop once mean |v - v_prev| < thresh

    needs_tokens: ClassVar[bool] = True
    max_prompts: ClassVar[int | None] = None

    @property
    def balanced(self) -> bool:
        """Whether the transport is balanced (T 1 = 1 / M; PLOT's, `fpl_bench.ot`) rather than
        partial (T 1 <= 1 / M; FedOTP's, whatever top_percent)."""
        return False

    def _plan(self, sim: Tensor) -> Tensor:
        """Transport plans [..., P, N] for similarities [..., P, N] (no gradient)."""
        return sinkhorn(
            1.0 - sim,
            eps=self.eps,
            top_percent=self.top_percent,
            max_iter=self.max_iter,
            thresh=self.thresh,
            check_every=_CHECK_EVERY,
            balanced=self.balanced,
        )

    def logits(
        self,
        text: Tensor,
        images: Tensor,
        tokens: Tensor | None,
        ctx: EncodeContext,
        given: Tensor | None = None,
    ) -> Tensor:
        """OT logits [B, n] (or [n] for one image) from patch tokens [B, P, D] (or [P, D]).

        `text` [N, n, D] are the prompts' text features; `images` (pooled) are not used.
        given: the plans [B, n, P, N] (or [n, P, N]) from `batch_constants`; None solves them.
        """
        sim = self._similarities(text, tokens)  # [*, n, P, N]
        plan = self._plan(sim) if given is None else given  # [*, n, P, N], no gradient
        return self._score(plan, sim, ctx)  # [*, n]

    @staticmethod
    def _similarities(text: Tensor, tokens: Tensor | None) -> Tensor:
        """S [*, n, P, N]: cosine of every patch token [*, P, D] with every text feature."""
        if tokens is None:
            raise ValueError("the ot learner scores patch tokens: call logits with [B, P, D]")
        patches = F.normalize(tokens, dim=-1)
        return torch.einsum("...md,ncd->...cmn", patches, text)

    @staticmethod
    def _score(plan: Tensor, sim: Tensor, ctx: EncodeContext) -> Tensor:
        """logit = logit_scale * sum_{m, n} T_mn S_mn over the last two dims."""
        return ctx.tower.logit_scale * (plan * sim).sum(dim=(-2, -1))

    def _logit_bound(self, sim: Tensor, ctx: EncodeContext) -> tuple[Tensor, float]:
        """(U [*, n], slack): U_c = s (top_percent / N) sum_n max_m S_mn >= logit_c (`predict_chunk`);
        slack = r s top_percent max |S|, a margin for float rounding, r = `_BOUND_SLACK` or
        256 units of rounding of sim's dtype if that is more."""
        scale = ctx.tower.logit_scale
        top = wide(sim.amax(dim=-2))  # [*, n, N], at least fp32 (fp64 stays fp64)
        bound = scale * (self.top_percent / sim.shape[-1]) * top.sum(-1)
        rel = max(_BOUND_SLACK, 256 * torch.finfo(sim.dtype).eps)
        return bound, rel * scale * self.top_percent * float(sim.abs().amax())

    def eval_chunk(self, text: Tensor, tokens: Tensor | None, ctx: EncodeContext) -> int:
        """As many images as give `_EVAL_ELEMENTS` similarity entries (N n P per image)."""
        if tokens is None:
            return super().eval_chunk(text, tokens, ctx)
        per_image = text.shape[0] * text.shape[1] * tokens.shape[-2]
        return max(1, _EVAL_ELEMENTS // per_image)

    def predict_chunk(
        self, text: Tensor, images: Tensor, tokens: Tensor | None, ctx: EncodeContext
    ) -> Tensor:
        """`logits(...).argmax(-1)` [B], solving only the transport problems that can decide it.

        A plan is non-negative with column sums b_n = top_percent / N (exact after every
        Sinkhorn iteration: the prompt step comes last), so

            logit_c = s sum_n sum_m T_mn S_mn  <=  s sum_n b_n max_m S_mn  =: U_c.

        Each image's class with the largest U is solved first; a class with U_c + slack below
        that logit cannot be the argmax (the slack, `_BOUND_SLACK` of the largest possible
        |logit|, covers float rounding of the plan and the sum) and is not solved; the rest
        are. Where that could rule out few classes (`_worth_pruning`: no class stands out, as
        with random features) every class is solved in one call instead. `sinkhorn` solves
        each problem alone with the same ops whatever the batch, so every solved logit is bit
        for bit the one `logits` computes, and so is the argmax (tests/methods/test_fedotp.py).
        """
        sim = self._similarities(text, tokens)  # [B, n, P, N]
        n_images, n_cls = sim.shape[:2]
        bound, slack = self._logit_bound(sim, ctx)  # [B, n], a float
        if n_cls < 2 or not math.isfinite(slack):  # slack is NaN or inf where sim is
            return self._score(self._plan(sim), sim, ctx).argmax(-1)
        problems = sim.flatten(0, 1)  # [B n, P, N]
        first = bound.argmax(-1) + n_cls * torch.arange(n_images, device=sim.device)  # [B]
        if not self._worth_pruning(problems[first], bound, slack, ctx):
            return self._score(self._plan(problems), problems, ctx).view_as(bound).argmax(-1)
        best = self._solve_scores(problems, first, ctx)  # [B]
        solved = torch.full_like(bound, -math.inf, dtype=best.dtype).flatten()
        solved[first] = best
        rest = bound + slack >= best.unsqueeze(-1)
        rest.view(-1)[first] = False
        ids = rest.view(-1).nonzero().squeeze(1)
        if len(ids):
            solved[ids] = self._solve_scores(problems, ids, ctx)
        return solved.view_as(bound).argmax(-1)

    def _solve_scores(self, problems: Tensor, ids: Tensor, ctx: EncodeContext) -> Tensor:
        """Logits [K] of the problems `ids` of similarities [*, P, N]."""
        chosen = problems.index_select(0, ids)  # [K, P, N]
        return self._score(self._plan(chosen), chosen, ctx)

    def _worth_pruning(
        self, first: Tensor, bound: Tensor, slack: float, ctx: EncodeContext
    ) -> bool:
        """Whether solving the first classes [B, P, N] may rule out `_MIN_RULED_OUT` of the
        classes: those whose bound U [B, n] + slack is below the first class's largest logit of
        a plan with entries <= 1 / M (each column's b_n on its best patches), which the solved
        plan approaches (its rows sum to <= 1 / M at convergence). Only a speed choice."""
        n_rows, n_cols = first.shape[-2:]
        fill = self.top_percent * n_rows / n_cols  # patches a column fills (fractional)
        whole = min(int(fill), n_rows)
        best = first.transpose(-2, -1).sort(dim=-1, descending=True).values  # [B, N, P]
        reach = best[..., :whole].sum(-1)  # [B, N]
        if whole < n_rows:
            reach = reach + (fill - whole) * best[..., whole]
        reach = ctx.tower.logit_scale * reach.sum(-1) / n_rows  # [B]
        ruled_out = int((bound + slack < reach.unsqueeze(-1)).sum())
        return ruled_out >= _MIN_RULED_OUT * bound.numel()

    def batch_constants(self, text: Tensor, tokens: Tensor, ctx: EncodeContext) -> Tensor:
        """The transport plans [..., B, n, P, N] of a training batch, solved outside vmap.

        Under vmap (per-sample gradients, and the vmapped mean loss) every Sinkhorn problem
        would run max_iter iterations; here each stops at its own rule and leaves the working
        set (`sinkhorn`'s check_every), with the same plans: the plan carries no gradient, so
        it is a constant of the per-sample loss. text [..., N, n, D], tokens [..., B, P, D].
        """
        with torch.no_grad():
            patches = F.normalize(tokens, dim=-1)
            sim = torch.einsum("...bmd,...ncd->...bcmn", patches, text)  # [..., B, n, P, N]
            return self._plan(sim)
