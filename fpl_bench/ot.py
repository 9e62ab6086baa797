"""Entropic partial optimal transport by log-domain Sinkhorn iterations, batched and vmap-safe.

FedOTP (Li et al., "Global and Local Prompts Cooperation via Optimal Transport for Federated
Learning", CVPR 2024, arXiv:2403.00041; reference HongxiaLee/FedOTP `trainers/GLP_OT.py`,
`CustomCLIP.entropic_COT_fast`, there adapted from POT's `ot.partial.entropic_partial_wasserstein`)
matches the M patch tokens of an image to the N prompts of a class with a transport plan T
[M, N] whose prompt side is exact and whose patch side is only an upper bound:

    T* = argmin_T  <C, T> + eps sum_mn T_mn (log T_mn - 1)     C [M, N] the cost (1 - cosine)
         s.t.      T >= 0,  T 1 <= a,  T^T 1 = b
    a_m = 1 / M                    patch m ships at most a_m
    b_n = top_percent / N          prompt n receives exactly b_n

The plan moves total mass top_percent <= 1 = sum(a): with top_percent < 1 only the best-matched
patches (low cost) are transported, each up to its cap a_m, and the rest of the image is left
out ("unbalanced" in the paper; partial transport in POT's terms). With uniform costs
T = top_percent / (M N) everywhere.

The same problem in POT is `ot.partial.entropic_partial_wasserstein(a, b, C, reg=eps,
m=top_percent)` (Benamou et al. 2015, SIAM J. Sci. Comput., prop. 5): it asks T 1 <= a,
T^T 1 <= b and 1^T T 1 = m, which with m = sum(b) = top_percent force T^T 1 = b, and its entropy
sum T log T differs from ours by eps m, a constant there; so the minimiser is the same. POT
reaches it by Dykstra's Bregman projections, a different iteration: tests/test_ot.py uses its
log-domain form `entropic_partial_wasserstein_logscale` as the oracle. (`ot.unbalanced`, with
KL-penalised marginals, is a different problem.)

The reference iterates the scalings u = e^f, v = e^g, with K = exp(-C / eps), T = diag(u) K diag(v):

    u = 1, v = 1; repeat at most max_iter times:
        u <- min(a / (K v), 1)
        v <- b / (K^T u)
        stop once mean_n |v_n - v_prev_n| < thresh

This is exact block-coordinate ascent on the dual max_{f <= 0, g} <f, a> + <g, b> - <e^f, K e^g>
(the row step is the unconstrained maximiser a / (K v) clipped to u <= 1, the proximal step of
T 1 <= a in Chizat et al. 2018, arXiv:1607.05816), so it converges to T*. Every column sum of T
equals b_n after each iteration; the row bound holds at convergence.

Implementation:
- Log domain. `sinkhorn` runs the same iterates on the potentials f = log u, g = log v:

      f_m <- min(log a_m - logsumexp_n(g_n - C_mn / eps), 0)
      g_n <- log b_n - logsumexp_m(f_m - C_mn / eps)
      T_mn = exp(f_m + g_n - C_mn / eps)

  In the scaling form a small eps (FedOTP searches 0.005-1; its few-shot script uses 0.01) or a
  wide cost range underflows whole rows or columns of K and overflows u or v in float32, and the
  plan turns to inf/NaN; here every quantity is a finite logarithm and T_mn <= b_n <= 1.
- For float32 accuracy the costs are shifted per column, C~_mn = C_mn - c_n with c_n = min_m C_mn,
  and the iteration runs on g~_n = g_n - c_n / eps: exact in real arithmetic, and |g~| stays
  small where g ~ c / eps would be held to float32's ulp of hundreds.
- Base 2: the iterates are computed as f log2(e), g log2(e) with exp2/log2, which are about twice
  as fast as exp/log on CPU. Every logsumexp subtracts its maximum, and terms below
  2^floor (a normal float near the smallest) are raised to it: that moves a sum whose largest term
  is 1 by at most M 2^floor, far below rounding, and keeps exp2 off the slow subnormal path.
- Stopping rule as the reference's, on v = e^g, without forming e^g (it overflows):
  |e^x - e^y| = e^{max(x, y)} (1 - e^{-|x - y|}); see `_stops`.
- Batched over all leading dims ([..., M, N], e.g. images x classes). There is no host sync per
  iteration: every problem runs the same tensor ops, and a problem is frozen (`torch.where`)
  from the iteration at which it meets the stopping rule, so it keeps exactly the (f, g) the
  reference's `break` would have kept. Each problem stops on its own rule; the reference stops a
  whole batch on the batch mean of |v - v_prev|, which makes an image's plan depend on the other
  images in its batch. No data-dependent Python control flow, so `torch.func.vmap` works.
- `check_every > 0` allows one host sync every that many iterations: the problems that have
  stopped are written out and dropped from the working set, and the loop ends once none is
  left (`_solve_compacting`). The result is identical (frozen problems no longer change, and
  each problem's ops read only its own entries); the cost follows the problems still
  iterating, not the slowest one. Skipped inside `torch.func` transforms (vmap, grad), where a
  host sync is an error: there every problem runs max_iter iterations (`_solve_frozen`), which
  is why the OT learner computes its training plans for the whole batch outside vmap.
- No gradient flows through the plan: the reference computes it under `torch.no_grad()`, and so
  does `sinkhorn` (on the detached cost). Gradients reach the prompts through the similarities
  that the caller multiplies with T. Runs in float32 at least (fp16/bf16 costs are upcast).
- Cost per iteration: one exp2 per kernel entry (the prompt step) and one exp2 and log2 per patch
  (the patch step, a fold over the few prompts), against none in the scaling form: about 2-3x
  its time on CPU. Only the small g is frozen per iteration; the f that goes with it is
  recomputed once at the end from the g it was made from.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["sinkhorn"]

_LOG2E = math.log2(math.e)

# True for a tensor wrapped by a torch.func transform (vmap's BatchedTensor, grad's wrapper).
_is_transformed = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)


def _may_sync(t: Tensor) -> bool:
    """Whether `bool(tensor)` is allowed: not inside vmap/grad (or when we cannot tell)."""
    return _is_transformed is not None and not _is_transformed(t)


def _logsumexp2(x: Tensor, dim: int, *, floor: float) -> Tensor:
    """log2 sum_i 2^{x_i} over `dim` = top + log2 sum_i 2^{max(x_i - top, floor)}, top = max x.

    Consumes `x` (a temporary of the caller's) in place.
    """
    top = x.amax(dim=dim, keepdim=True)
    total = x.sub_(top).clamp_min_(floor).exp2_().sum(dim=dim)
    return total.log2_().add_(top.squeeze(dim))


def _logaddexp2(x: Tensor, y: Tensor, *, floor: float) -> Tensor:
    """log2(2^x + 2^y) = max(x, y) + log2(1 + 2^{max(-|x - y|, floor)})."""
    return torch.maximum(x, y).add_((x - y).abs_().neg_().clamp_min_(floor).exp2_().add_(1).log2_())


def _patch_potential(log_kernel: Tensor, g: Tensor, *, log_a: float, floor: float) -> Tensor:
    """f_m = min(log a - logsumexp_n(log K_nm + g_n), 0) [..., M], all in base 2.

    log_kernel [..., N, M]; g [..., N]. The sum over the few prompts is a fold of `_logaddexp2`
    over [..., M] slices: for N = 2 (FedOTP) one exp2 and one log2 per patch.
    """
    lse = log_kernel[..., 0, :] + g[..., 0:1]
    for n in range(1, g.shape[-1]):
        lse = _logaddexp2(lse, log_kernel[..., n, :] + g[..., n : n + 1], floor=floor)
    return lse.neg_().add_(log_a).clamp_max_(0.0)


def _prompt_potential(log_kernel: Tensor, f: Tensor, *, log_b: float, floor: float) -> Tensor:
    """g_n = log b - logsumexp_m(log K_nm + f_m) [..., N], all in base 2; log_kernel [..., N, M]."""
    return _logsumexp2(log_kernel + f.unsqueeze(-2), dim=-1, floor=floor).neg_().add_(log_b)


def _stops(g_new: Tensor, g_old: Tensor, shift: Tensor, *, log_thresh: float) -> Tensor:
    """mean_n |v_new,n - v_old,n| < thresh [...], v = 2^{g + shift}; g, shift [..., N] (base 2).

    Never forms v (it overflows): |2^x - 2^y| = 2^{max(x, y)} (1 - 2^{-|x - y|}), so with
    h_n = max(g_new,n, g_old,n) + shift_n and s = max_n h_n the rule reads
    log2 sum_n 2^{h_n - s} (1 - 2^{-|g_new,n - g_old,n|}) < log2(N thresh) - s. Every power is
    <= 1; equal potentials give log 0 = -inf (stop). The gap is taken before adding the shift,
    which float32 would round it into.
    """
    top = torch.maximum(g_new, g_old).add_(shift)
    scale = top.amax(dim=-1, keepdim=True)
    gap = (g_new - g_old).abs_().mul_(-math.log(2.0))
    change = (top - scale).exp2_().mul_(torch.expm1(gap).neg_()).sum(dim=-1)
    return change.log2_() < log_thresh + math.log2(g_new.shape[-1]) - scale.squeeze(-1)


def _iteration(
    log_kernel: Tensor,
    g: Tensor,
    g_prev: Tensor,
    done: Tensor,
    shift: Tensor,
    *,
    log_a: float,
    log_b: float,
    log_thresh: float,
    floor: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One Sinkhorn iteration of every problem that has not stopped: (g_prev, g, done).

    A problem that meets the stopping rule takes this iteration's g and keeps it (and the g its
    f was computed from, g_prev) from then on, as the reference's `break` would.
    """
    f = _patch_potential(log_kernel, g, log_a=log_a, floor=floor)  # [..., M]
    g_new = _prompt_potential(log_kernel, f, log_b=log_b, floor=floor)  # [..., N]
    stops = _stops(g_new, g, shift, log_thresh=log_thresh)  # [...]
    keep = done.unsqueeze(-1)
    return torch.where(keep, g_prev, g), torch.where(keep, g, g_new), done | stops


def _solve_frozen(
    log_kernel: Tensor, shift: Tensor, *, max_iter: int, **rule: float
) -> tuple[Tensor, Tensor]:
    """(g, g_prev) [..., N] after max_iter iterations of all problems, each frozen from its own
    stop: the same ops for every problem and no host sync, so it runs under vmap and grad."""
    g = -shift  # g~ for the reference's start v = 1 (g = 0)
    g_prev = g  # the g that the kept f was computed from
    done = torch.zeros(shift.shape[:-1], dtype=torch.bool, device=shift.device)  # [...]
    for _ in range(max_iter):
        g_prev, g, done = _iteration(log_kernel, g, g_prev, done, shift, **rule)
    return g, g_prev


def _solve_compacting(
    log_kernel: Tensor, shift: Tensor, *, max_iter: int, check_every: int, **rule: float
) -> tuple[Tensor, Tensor]:
    """`_solve_frozen`'s (g, g_prev), iterating only the problems that have not stopped.

    Every `check_every` iterations (one host sync) the stopped problems are written out and
    dropped from the working set, and the loop ends once none is left. A stopped problem no
    longer changes under `_solve_frozen`, and every op acts on each problem alone, so the
    result is the same; the work falls with the number of problems still iterating.
    """
    n_cols, n_rows = log_kernel.shape[-2], log_kernel.shape[-1]
    lead = shift.shape[:-1]
    kernel = log_kernel.reshape(-1, n_cols, n_rows)  # [P, N, M], P problems
    shift = shift.reshape(-1, n_cols)  # [P, N]
    out_g = -shift
    out_prev = out_g.clone()
    ids = torch.arange(shift.shape[0], device=shift.device)  # the working set's problems
    g, g_prev = out_g.clone(), out_prev.clone()
    done = torch.zeros(shift.shape[0], dtype=torch.bool, device=shift.device)
    for it in range(max_iter):
        g_prev, g, done = _iteration(kernel, g, g_prev, done, shift, **rule)
        if (it + 1) % check_every == 0 and bool(done.any()):
            out_g[ids[done]], out_prev[ids[done]] = g[done], g_prev[done]
            keep = ~done
            if not bool(keep.any()):
                break
            kernel, shift, ids = kernel[keep], shift[keep], ids[keep]
            g, g_prev, done = g[keep], g_prev[keep], done[keep]
    else:
        out_g[ids], out_prev[ids] = g, g_prev
    return out_g.reshape(*lead, n_cols), out_prev.reshape(*lead, n_cols)


def sinkhorn(
    cost: Tensor,
    *,
    eps: float = 0.1,
    top_percent: float = 0.8,
    max_iter: int = 100,
    thresh: float = 1e-3,
    check_every: int = 0,
) -> Tensor:
    """Entropic partial OT plan [..., M, N] for costs [..., M, N] (see the module docstring).

    eps: entropic regularisation (K = exp(-C / eps)); top_percent: total mass moved, in (0, 1];
    max_iter: iterations at most; thresh: stop a problem once mean_n |v_n - v_prev_n| < thresh
    (v = e^g, the reference's scaling); check_every: 0 never syncs with the host; k > 0 ends the
    loop early, checked every k iterations, once all problems have stopped (same result; ignored
    under vmap/grad). Column sums are top_percent / N; row sums <= 1 / M at convergence. Finite
    for every finite cost and eps > 0 (log domain). Carries no gradient.
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
    # base 2 throughout: log2 a, log2 b, log2 thresh; 2^floor is a normal float
    log_a, log_b = -math.log2(n_rows), math.log2(top_percent / n_cols)
    log_thresh = math.log2(thresh)
    floor = math.log2(torch.finfo(work.dtype).tiny) + 1.0
    with torch.no_grad():
        col_min = work.amin(dim=-2)  # [..., N]  c_n
        # log2 K~_nm = -(C_mn - c_n) log2(e) / eps <= 0, with a 0 in every column
        log_kernel = (col_min.unsqueeze(-1) - work.transpose(-1, -2)).mul_(_LOG2E / eps)
        log_kernel = log_kernel.contiguous()  # [..., N, M], M innermost (the sub kept C's layout)
        shift = col_min * (_LOG2E / eps)  # [..., N]  g = g~ + shift (base 2)
        rule = dict(log_a=log_a, log_b=log_b, log_thresh=log_thresh, floor=floor)
        if early:
            g, g_prev = _solve_compacting(
                log_kernel, shift, max_iter=max_iter, check_every=check_every, **rule
            )
        else:
            g, g_prev = _solve_frozen(log_kernel, shift, max_iter=max_iter, **rule)
        # f of the last accepted iteration, recomputed once instead of frozen every iteration
        f = _patch_potential(log_kernel, g_prev, log_a=log_a, floor=floor)
        log_plan = (f.unsqueeze(-1) + g.unsqueeze(-2)).add_(log_kernel.transpose(-1, -2))
        # entries below 2^floor are set to 0 rather than computed as subnormals (slow path)
        plan = log_plan.clamp_min(floor).exp2_().masked_fill_(log_plan < floor, 0.0)
    return plan.to(cost.dtype)  # [..., M, N]
