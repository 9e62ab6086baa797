"""DP-FPL (Tran et al., "Privacy-Preserving Personalized Federated Prompt Learning for
Multimodal Large Language Models", ICLR 2025, arXiv:2501.13904; reference linhhtran/DP-FPL
`trainers/DP_FPL.py`, `federated_main.py`).

Client i's prompt p_i = p_G + p_L,i. Every local step:

1. p_L,i is factorized by one power-method step (random v0 ~ N(0, 1) [W, k]):
       u = orth(p_L v0) [n_ctx, k],  v = orth(p_L^T u)^T [k, W],  r = p_L - u v
   so that p_i = p_G + u v + r exactly (with `residual=False`, the paper's DP-LoRA ablation,
   the prompt is p_G + u v).
2. Per-sample gradients are taken w.r.t. (p_G, u, v) and clipped jointly to C. p_G's clipped
   sums go to the server, which adds N(0, (sigma C)^2) to their sum over clients and applies
   the mean (the reference syncs p_G's gradient every batch, so `sync = "step"`); u and v get
   the same noise on the client (p_L never leaves it, but the personalized prompt is released).
3. p_L's gradient is rebuilt from the noisy grad_u, grad_v by the paper's Eq. 4:
       grad p_L = grad_u v + u grad_v - u u^T grad_u v
   The residual r is not noised: it gets no gradient of its own.

Departures from the reference (each shown by a test in tests/methods/test_dpfpl.py):
per-sample clipping (the reference clips the batch-mean gradient); the u u^T term has the
paper's minus sign (the reference adds it); no bare `/ 10.0` on the gradients; per-client
optimizer state (the reference shares one); noise calibrated for the steps actually taken.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from fpl_bench.learners._base import InitContext, Params, PromptLearner
from fpl_bench.schemes import SCHEMES
from fpl_bench.schemes._base import Scheme, check_rank


def orthonormal_columns(matrix: Tensor) -> Tensor:
    """Gram-Schmidt orthonormalisation of the columns of `matrix` [m, k] (QR with R's diagonal
    made positive, which is what classical Gram-Schmidt returns)."""
    q, r = torch.linalg.qr(matrix)
    signs = torch.sign(torch.diagonal(r))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs


def power_factorize(
    p_local: Tensor, *, rank: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """One power-method step: p_local [n, W] -> (u [n, k], v [k, W], r [n, W]), u v + r = p_local."""
    v0 = torch.randn(p_local.shape[1], rank, generator=generator, dtype=p_local.dtype).to(
        p_local.device
    )
    u = orthonormal_columns(p_local @ v0)  # [n, k]
    v = orthonormal_columns(p_local.T @ u).T  # [k, W]
    return u, v, p_local - u @ v


def low_rank_gradient(u: Tensor, v: Tensor, grad_u: Tensor, grad_v: Tensor) -> Tensor:
    """Eq. 4 of the paper: grad p_L = grad_u v + u grad_v - u u^T grad_u v   ([n, W])."""
    gu_v = grad_u @ v
    return gu_v + u @ grad_v - u @ (u.T @ gu_v)


@SCHEMES.register("dpfpl")
@dataclass(frozen=True)
class DPFPL(Scheme):
    """Global prompt + low-rank local prompt with residual, DP on both."""

    rank: int  # k in the paper
    residual: bool  # False: DP-LoRA ablation

    shared: ClassVar[tuple[str, ...]] = ("p_global",)
    sync: ClassVar[Literal["round", "step"]] = "step"

    def check(self, init: InitContext) -> None:
        check_rank(self.rank, init, "rank")

    def init_params(self, init: InitContext, learner: PromptLearner) -> Params:
        return {"p_global": learner.init_prompt(init), "p_local": learner.init_prompt(init)}

    def step_params(
        self, params: Mapping[str, Tensor], generator: torch.Generator
    ) -> tuple[Params, Params]:
        u, v, r = power_factorize(params["p_local"].detach(), rank=self.rank, generator=generator)
        aux = {"r": r if self.residual else torch.zeros_like(r)}
        return {"p_global": params["p_global"], "u": u, "v": v}, aux

    def prompts(self, step: Mapping[str, Tensor], aux: Mapping[str, Tensor]) -> Tensor:
        return (step["p_global"] + step["u"] @ step["v"] + aux["r"]).unsqueeze(0)

    def param_grads(
        self, params: Mapping[str, Tensor], step: Mapping[str, Tensor], grads: Mapping[str, Tensor]
    ) -> Params:
        out = {k: g for k, g in grads.items() if k not in ("u", "v")}
        if "u" in grads:
            out["p_local"] = low_rank_gradient(step["u"], step["v"], grads["u"], grads["v"])
        return out
