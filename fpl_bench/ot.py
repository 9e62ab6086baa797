"""Entropic unbalanced optimal transport between image patch tokens and prompts, batched.

FedOTP (Li et al., CVPR 2024, arXiv:2403.00041; reference HongxiaLee/FedOTP
`trainers/GLP_OT.py`, `entropic_COT_fast`, itself adapted from POT's
`ot.partial.entropic_partial_wasserstein`) matches the M patch tokens of an image to the N
prompts of a class with a partial transport plan:

    K = exp(-C / eps),                    C = 1 - cos(token_m, prompt_n)
    a_m = 1 / M    (patch side: an upper bound; each patch may ship less)
    b_n = rho / N  (prompt side: exact; total mass rho = top_percent <= 1)
    repeat:  u = min(a / (K v), 1),  v = b / (K^T u)
    T = diag(u) K diag(v)

so each row sum is min(a_m, (K v)_m) <= a_m and each column sum is exactly b_n: only the
`top_percent` best-matching patch mass is transported. The loop stops per problem once
mean |v - v_prev| < thresh; here every problem runs in the same tensor ops and a converged
problem is frozen with `torch.where`, so there is no host sync per iteration and the function
works under `torch.func.vmap`. With `check_every`, the caller allows one host sync every that
many iterations to stop early when every problem has converged (evaluation only).
"""

from __future__ import annotations

import torch
from torch import Tensor


def partial_sinkhorn(
    cost: Tensor,
    *,
    eps: float = 0.1,
    top_percent: float = 0.8,
    max_iter: int = 100,
    thresh: float = 1e-3,
    check_every: int = 0,
) -> Tensor:
    """Transport plan [..., M, N] for costs [..., M, N] (computed without gradient)."""
    with torch.no_grad():
        cost = cost.detach()
        m, n = cost.shape[-2], cost.shape[-1]
        kernel = torch.exp(-cost / eps)  # [..., M, N]
        a = 1.0 / m
        b = min(top_percent, 1.0) / n
        u = torch.ones(cost.shape[:-1], dtype=cost.dtype, device=cost.device)  # [..., M]
        v = torch.ones((*cost.shape[:-2], n), dtype=cost.dtype, device=cost.device)  # [..., N]
        done = torch.zeros(cost.shape[:-2], dtype=torch.bool, device=cost.device)  # [...]
        for it in range(max_iter):
            u_new = torch.clamp(a / (kernel @ v.unsqueeze(-1)).squeeze(-1), max=1.0)
            v_new = b / (kernel.transpose(-1, -2) @ u_new.unsqueeze(-1)).squeeze(-1)
            keep = done.unsqueeze(-1)
            u = torch.where(keep, u, u_new)
            v_next = torch.where(keep, v, v_new)
            done = done | ((v_next - v).abs().mean(-1) < thresh)
            v = v_next
            if check_every and (it + 1) % check_every == 0 and bool(done.all()):
                break
        return u.unsqueeze(-1) * kernel * v.unsqueeze(-2)
