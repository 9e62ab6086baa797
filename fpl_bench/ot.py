"""Entropic unbalanced optimal transport by Sinkhorn iterations, batched and vmap-safe.

FedOTP (Li et al., "Global and Local Prompts Cooperation via Optimal Transport for Federated
Learning", CVPR 2024, arXiv:2403.00041; reference HongxiaLee/FedOTP `trainers/GLP_OT.py`,
`CustomCLIP.entropic_COT_fast`, there adapted from POT's `ot.partial.entropic_partial_wasserstein`)
matches the M patch tokens of an image to the N prompts of a class with a transport plan T
[M, N] whose prompt side is exact and whose patch side is only an upper bound:

    K = exp(-C / eps)                      C [M, N] the cost (FedOTP: 1 - cosine similarity)
    a_m = 1 / M                            patch m ships at most a_m      (T 1 <= a)
    b_n = top_percent / N                  prompt n receives exactly b_n  (T^T 1 = b)
    u = 1, v = 1; repeat at most max_iter times:
        u <- min(a / (K v), 1)             the min is the inequality on the patch side
        v <- b / (K^T u)
        stop once mean_n |v_n - v_prev_n| < thresh
    T = diag(u) K diag(v)

The plan moves total mass top_percent <= 1 = sum(a): with top_percent < 1 only the best-matched
patches (low cost) are transported, each up to its cap a_m, and the rest of the image is left
out ("unbalanced" in the paper). Every column sum of T equals b_n exactly after each iteration;
the row bound holds at convergence. With uniform costs T = top_percent / (M N) everywhere.

Implementation:
- Batched over all leading dims ([..., M, N], e.g. images x classes). There is no host sync per
  iteration: every problem runs the same tensor ops, and a problem is frozen (`torch.where`)
  from the iteration at which it meets the stopping rule, so it keeps exactly the (u, v) the
  reference's `break` would have kept. Each problem stops on its own rule; the reference stops a
  whole batch on the batch mean of |v - v_prev|, which makes an image's plan depend on the other
  images in its batch. No data-dependent Python control flow, so `torch.func.vmap` works.
- `check_every > 0` allows one host sync every that many iterations to end the loop once every
  problem is frozen. The result is identical (frozen problems no longer change); the check is
  skipped inside `torch.func` transforms (vmap, grad), where it would be an error.
- No gradient flows through the plan: the reference computes it under `torch.no_grad()`, and so
  does `sinkhorn` (on the detached cost). Gradients reach the prompts through the similarities
  that the caller multiplies with T.
- Numerical range: the kernel's columns are rescaled, K~_mn = exp(-(C_mn - c_n) / eps) with
  c_n = min_m C_mn, so every column has maximum 1. The scale is absorbed exactly by
  v~_n = v_n exp(-c_n / eps) (start v~ = exp(-c / eps); stopping rule on v = v~ exp(c / eps)),
  so the iterates are those of the reference in exact arithmetic, but a small eps (the
  reference's few-shot script uses 0.01) cannot underflow a whole column of K to zero and turn
  the plan into NaN. Runs in float32 at least (fp16/bf16 costs are upcast).
- Cost per iteration: two passes over K (K v summed over the few prompts, K^T u as a batched
  matrix-vector product) plus elementwise work on u; only the small v is frozen per iteration,
  and the u that goes with it is recomputed once at the end from the v it was made from.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sinkhorn"]

# True for a tensor wrapped by a torch.func transform (vmap's BatchedTensor, grad's wrapper).
_is_transformed = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)


def _may_sync(t: Tensor) -> bool:
    """Whether `bool(tensor)` is allowed: not inside vmap/grad (or when we cannot tell)."""
    return _is_transformed is not None and not _is_transformed(t)


def sinkhorn(
    cost: Tensor,
    *,
    eps: float = 0.1,
    top_percent: float = 0.8,
    max_iter: int = 100,
    thresh: float = 1e-3,
    check_every: int = 0,
) -> Tensor:
    """Unbalanced entropic OT plan [..., M, N] for costs [..., M, N] (see the module docstring).

    eps: entropic regularisation (K = exp(-C / eps)); top_percent: total mass moved, in (0, 1];
    max_iter: iterations at most; thresh: stop a problem once mean_n |v_n - v_prev_n| < thresh;
    check_every: 0 never syncs with the host; k > 0 ends the loop early, checked every k
    iterations, once all problems have stopped (same result; ignored under vmap/grad).
    Column sums are top_percent / N; row sums <= 1 / M at convergence. Carries no gradient.
    """
    if eps <= 0 or not 0 < top_percent <= 1 or max_iter < 1 or thresh <= 0:
        raise ValueError(
            f"sinkhorn needs eps > 0, 0 < top_percent <= 1, max_iter >= 1, thresh > 0; got "
            f"eps={eps}, top_percent={top_percent}, max_iter={max_iter}, thresh={thresh}"
        )
    n_rows, n_cols = cost.shape[-2], cost.shape[-1]
    early = check_every > 0 and _may_sync(cost)
    work = cost.detach()
    if work.dtype not in (torch.float32, torch.float64):
        work = work.float()
    with torch.no_grad():
        shift = work.amin(dim=-2, keepdim=True)  # [..., 1, N]  c_n
        kernel_t = torch.exp((shift - work) / eps).transpose(-1, -2).contiguous()  # [..., N, M]
        # s_n = v_n / v~_n = exp(c_n / eps), for the stopping rule on the unscaled v; capped at
        # the largest float (an inf would turn a zero change into NaN: never "converged").
        scale = torch.exp(shift.squeeze(-2) / eps).clamp(max=torch.finfo(work.dtype).max)
        a = 1.0 / n_rows
        b = top_percent / n_cols

        def patch_scaling(v: Tensor) -> Tensor:
            """u = min(a / (K v), 1) [..., M]; K v summed over the N prompts (N is small)."""
            kv = kernel_t[..., 0, :] * v[..., 0:1]
            for j in range(1, n_cols):
                kv = torch.addcmul(kv, kernel_t[..., j, :], v[..., j : j + 1])
            return kv.reciprocal_().mul_(a).clamp_max_(1.0)

        v = 1.0 / scale  # [..., N]  v~ for the reference's start v = 1
        v_prev = v  # the v that the kept u was computed from
        done = torch.zeros(work.shape[:-2], dtype=torch.bool, device=work.device)  # [...]
        for it in range(max_iter):
            u = patch_scaling(v)  # [..., M]
            v_new = b / (kernel_t @ u.unsqueeze(-1)).squeeze(-1)  # [..., N]
            stops = (v_new - v).abs_().mul_(scale).mean(dim=-1) < thresh  # [...]
            keep = done.unsqueeze(-1)
            v_prev = torch.where(keep, v_prev, v)
            v = torch.where(keep, v, v_new)
            done = done | stops
            if early and (it + 1) % check_every == 0 and bool(done.all()):
                break
        # u of the last accepted iteration, recomputed once instead of frozen every iteration
        u = patch_scaling(v_prev)
        plan = u.unsqueeze(-1) * kernel_t.transpose(-1, -2) * v.unsqueeze(-2)  # [..., M, N]
    return plan.to(cost.dtype)
