"""Entropic partial (and balanced) optimal transport by Sinkhorn iterations, batched, vmap-safe.

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

Balanced transport (`balanced=True`, top_percent = 1): PLOT (Chen et al., "PLOT: Prompt Learning
with Optimal Transport for Vision-Language Models", ICLR 2023, arXiv:2210.01253; reference
CHENGY12/PLOT `plot-coop/trainers/plot.py`, `CustomCLIP.Sinkhorn`) asks T 1 = a and T^T 1 = b
and runs plain Sinkhorn (Cuturi 2013, arXiv:1306.0895): the iteration above without the cap,
u <- a / (K v), from the same start v = 1 (the reference's r and c). The capped iteration at
top_percent = 1 has the same minimiser (sum b = sum a forces T 1 = a), but at CLIP-like costs
K v < a in most rows, the cap binds and it needs ~1000 iterations where plain Sinkhorn needs
~5: after 100 its row sums are still off a by several percent (tests/test_plot.py). The
reference stops once mean_m |u_m - u_prev,m| < 1e-2; here the stopping rule is the one above.

Implementation (`sinkhorn`):
- Costs are shifted per column, C~_mn = C_mn - c_n with c_n = min_m C_mn, and the iteration runs
  on v~_n = v_n e^{-c_n / eps} with the kernel K~ = exp(-C~ / eps): exact in real arithmetic,
  K~ <= 1 with a 1 in every column, and a cost shared by all patches (a uniform shift of C)
  drops out of every quantity but the stopping rule's v = v~ e^{c / eps}.
- Two forms of the same iterates, chosen per problem:
  * the scaling form (the reference's, on u and v~) where K~ and the start v~ = e^{-c / eps}
    lie within tiny^(+-0.4) (tiny the smallest normal float; in float32 max C~ / eps <= 35,
    which every cosine-cost problem meets at eps >= 0.06, and c / eps >= -35) and
    c / eps <= 567: per step two multiplies and two adds per kernel entry and one divide per
    patch, no exp or log. v~ >= b / M after every step (K~ and u are <= 1; balanced, u is
    not capped and the start must also lie above tiny^0.4, so that it is not raised); a
    problem whose v~ leaves the float range all the same (non-finite or zero) is solved again
    in the log domain. The stopping rule is taken on |v~ - v~_prev| e^{c / eps}, in float64.
  * the log domain on f = log u, g~ = log v~ elsewhere (small eps, wide costs), where K~ or the
    scalings leave the float range and the scaling form gives inf/NaN plans:

        f_m <- min(log a - logsumexp_n(g~_n - C~_mn / eps), 0)      (balanced: no min)
        g~_n <- log b - logsumexp_m(f_m - C~_mn / eps)

    Every logsumexp subtracts its maximum, and terms below e^floor (a normal float near the
    smallest) are raised to it: that moves a sum whose largest term is 1 by at most M e^floor,
    far below rounding, and keeps exp off the slow subnormal path. The stopping rule is taken
    in logs (v overflows): |e^x - e^y| = e^{max(x, y)} (1 - e^{-|x - y|}); see
    `_LogDomain.stops`.
- Batched over all leading dims ([..., M, N], e.g. images x classes), laid out [N, P, M] for P
  problems, so that a step is a few elementwise ops over all problems and the sum over patches
  runs over the innermost dim. Each problem stops on its own rule and keeps exactly the
  (v~, the v~ its u was computed from) of the iteration at which it meets it, as the
  reference's `break` would; the reference stops a whole batch on the batch mean of
  |v - v_prev|, which makes an image's plan depend on the other images in its batch.
- A problem's plan is the same bit for bit whatever else is in the batch (tests/test_ot.py): its
  ops read only its own entries, sums over patches run over the innermost dim (torch.sum over
  an outer dim picks its order by the tensor's shape) and sums over prompts in a fixed order,
  and the only transcendental functions are exp, log and expm1, which give the same bits at
  every position of a tensor on CPU (exp2, log2 and logaddexp do not: their vectorised loops
  and scalar tails round differently). The OT learner's evaluation relies on this.
- Iterations run in blocks of `check_every`, the iterates kept; after a block one host sync
  finds each problem's first iteration that meets the rule, writes that iterate out and drops
  the problem from the working set (`_solve`): the cost follows the problems still iterating.
  Inside `torch.func` transforms (vmap, grad), where a host sync is an error, and with
  check_every = 0, one block of max_iter iterations runs for every problem in both forms, each
  problem taking the one it qualifies for: no data-dependent Python control flow, so
  `torch.func.vmap` works, with the same plans as outside it (at several times the cost, which
  is why the OT learner computes its training plans for the whole batch outside vmap).
- No gradient flows through the plan: the reference computes it under `torch.no_grad()`, and so
  does `sinkhorn` (on the detached cost). Gradients reach the prompts through the similarities
  that the caller multiplies with T. Runs in float32 at least (fp16/bf16 costs are upcast).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["sinkhorn"]

# The scaling form runs where every kernel entry and the start v~ lie within
# tiny^(+-_SCALING_RANGE) (tiny: the smallest normal float of the cost's dtype) and e^{c / eps}
# (the stopping rule's v / v~) is at most float64 max^_SHIFT_RANGE (module docstring); the log
# domain elsewhere.
_SCALING_RANGE = 0.4
_SHIFT_RANGE = 0.8

# True for a tensor wrapped by a torch.func transform (vmap's BatchedTensor, grad's wrapper).
_is_transformed = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)


def _may_sync(t: Tensor) -> bool:
    """Whether `bool(tensor)` is allowed: not inside vmap/grad (or when we cannot tell)."""
    return _is_transformed is not None and not _is_transformed(t)


def _sum_prompts(x: Tensor) -> Tensor:
    """x[0] + x[1] + ... over the (few) prompts of x [N, ...], in that order."""
    total = x[0] if x.shape[0] == 1 else x[0] + x[1]
    for n in range(2, x.shape[0]):
        total.add_(x[n])
    return total


def _select(x: Tensor, ids: Tensor) -> Tensor:
    """Problems `ids` (int64 [K]) of x [N, P, ...] (problems on dim 1)."""
    return x.index_select(1, ids)


@dataclass
class _Scaling:
    """The reference's iteration on (u, v~) [N, P] for kernels K~ [N, P, M] in range (module
    docstring). `scale` = e^{c / eps} [N, P] in float64 turns v~ into the stopping rule's v;
    `buffered` reuses one work tensor (not under a torch.func transform); `capped` keeps
    u <= 1 (partial transport; False: balanced)."""

    kernel: Tensor
    scale: Tensor
    a: float
    b: float
    limit: float  # N thresh: the rule's bound on sum_n |v_n - v_prev_n|
    capped: bool
    buffered: bool
    _work: Tensor | None = field(default=None, repr=False)

    def _out(self) -> Tensor | None:
        if not self.buffered:
            return None
        if self._work is None:
            self._work = torch.empty_like(self.kernel)
        return self._work

    def start(self) -> Tensor:
        """v~ for the reference's v = 1: e^{-c / eps}, raised to the smallest normal float
        (below it K~ v~ < a in every row, so u = 1 either way)."""
        tiny = torch.finfo(self.kernel.dtype).tiny
        return self.scale.reciprocal().clamp_min_(tiny).to(self.kernel.dtype)

    def _row(self, v: Tensor) -> Tensor:
        """u = min(a / (K~ v~), 1) [P, M] (balanced: a / (K~ v~))."""
        kv = _sum_prompts(torch.mul(self.kernel, v.unsqueeze(2), out=self._out()))
        u = torch.div(self.a, kv)
        return u.clamp_max_(1.0) if self.capped else u

    def step(self, v: Tensor) -> Tensor:
        """v~ <- b / (K~^T u) [N, P], u from v~."""
        return torch.div(self.b, torch.mul(self.kernel, self._row(v), out=self._out()).sum(-1))

    def stops(self, history: Tensor, *, first: bool) -> Tensor:
        """[steps, P]: sum_n |v_n - v_prev_n| < N thresh after each step of history [steps + 1,
        N, P] (v = v~ scale, in float64); `first`: history[0] is the start v = 1."""
        moves = (history[1:] - history[:-1]).abs_().double()
        if first:  # the start exactly: |v~ scale - 1|
            start = (history[1].double() - self.scale.reciprocal()).abs_()
            moves = torch.cat([start.unsqueeze(0), moves[1:]])
        return _sum_prompts(moves.mul_(self.scale).transpose(0, 1)) < self.limit

    def plan(self, v: Tensor, v_prev: Tensor) -> Tensor:
        """T = diag(u) K~ diag(v~) [N, P, M] (transposed), u from v_prev as in the iteration."""
        return (self.kernel * self._row(v_prev)).mul_(v.unsqueeze(2))

    def take(self, ids: Tensor) -> _Scaling:
        kernel, scale = _select(self.kernel, ids), _select(self.scale, ids)
        return _Scaling(kernel, scale, self.a, self.b, self.limit, self.capped, self.buffered)


@dataclass
class _LogDomain:
    """The same iteration on (f, g~) [N, P] for log kernels -C~ / eps [N, P, M] (module
    docstring); shift = c / eps [N, P]."""

    log_kernel: Tensor
    shift: Tensor
    log_a: float
    log_b: float
    log_thresh: float
    floor: float  # log of a normal float near the smallest
    capped: bool  # f <= 0 (partial transport; False: balanced)

    def start(self) -> Tensor:
        return self.shift.neg()  # g~ for the reference's start v = 1 (g = 0)

    def _patch(self, g: Tensor) -> Tensor:
        """f_m = min(log a - logsumexp_n(log K~_nm + g~_n), 0) [P, M] (balanced: no min), a
        fold over the prompts: log(e^x + e^y) = max(x, y) + log(1 + e^{max(-|x - y|, floor)})."""
        total = self.log_kernel[0] + g[0].unsqueeze(1)
        for n in range(1, g.shape[0]):
            term = self.log_kernel[n] + g[n].unsqueeze(1)
            gap = (total - term).abs_().neg_().clamp_min_(self.floor).exp_().add_(1.0).log_()
            total = torch.maximum(total, term).add_(gap)
        f = total.neg_().add_(self.log_a)
        return f.clamp_max_(0.0) if self.capped else f

    def step(self, g: Tensor) -> Tensor:
        """g~_n = log b - logsumexp_m(log K~_nm + f_m) [N, P], f from g~."""
        terms = self.log_kernel + self._patch(g)  # [N, P, M]
        top = terms.amax(dim=-1, keepdim=True)
        total = terms.sub_(top).clamp_min_(self.floor).exp_().sum(-1)
        return total.log_().add_(top.squeeze(-1)).neg_().add_(self.log_b)

    def stops(self, history: Tensor, *, first: bool) -> Tensor:
        """[steps, P]: mean_n |v_n - v_prev_n| < thresh after each step of history [steps + 1,
        N, P], v = e^{g~ + shift}, in logs (v overflows): |e^x - e^y| = e^{max(x, y)}
        (1 - e^{-|x - y|}), so with h_n = max(g_n, g_prev,n) + shift_n and s = max_n h_n the rule
        reads log sum_n e^{h_n - s} (1 - e^{-|g_n - g_prev,n|}) < log(N thresh) - s. Every power
        is <= 1; equal potentials give log 0 = -inf (stop). The gap is taken before adding the
        shift, which float rounding would swallow it into."""
        g_new, g_old = history[1:], history[:-1]
        top = torch.maximum(g_new, g_old).add_(self.shift)
        scale = top.amax(dim=1, keepdim=True)
        gap = (g_new - g_old).abs_().neg_().expm1_().neg_()
        change = _sum_prompts(top.sub_(scale).exp_().mul_(gap).transpose(0, 1))
        return change.log_() < self.log_thresh + math.log(g_new.shape[1]) - scale.squeeze(1)

    def plan(self, g: Tensor, g_prev: Tensor) -> Tensor:
        """T = e^{f + log K~ + g~} [N, P, M] (transposed), f from g_prev as in the iteration;
        entries below e^floor are 0 rather than computed as subnormals (slow path)."""
        log_plan = (self.log_kernel + self._patch(g_prev)).add_(g.unsqueeze(2))
        return log_plan.clamp_min(self.floor).exp_().masked_fill_(log_plan < self.floor, 0.0)

    def take(self, ids: Tensor) -> _LogDomain:
        log_kernel, shift = _select(self.log_kernel, ids), _select(self.shift, ids)
        return _LogDomain(
            log_kernel, shift, self.log_a, self.log_b, self.log_thresh, self.floor, self.capped
        )


def _solve(form: _Scaling | _LogDomain, *, max_iter: int, block: int) -> tuple[Tensor, Tensor]:
    """(state at the stop, the state before it) [N, P] of every problem.

    Runs blocks of `block` iterations (0: one block of max_iter, no host sync), keeping the
    iterates; after a block each problem's first iteration that meets the stopping rule gives
    its result, and (block > 0) the problems that stopped leave the working set. A problem that
    never stops gives its iterate max_iter.
    """
    state = form.start()
    if block == 0:
        return _block(form, state, steps=max_iter, first=True)[:2]
    out_state, out_prev = torch.empty_like(state), torch.empty_like(state)
    ids = torch.arange(state.shape[1], device=state.device)  # the working set's problems
    for done in range(0, max_iter, block):
        steps = min(block, max_iter - done)
        stop, prev, stopped, state = _block(form, state, steps=steps, first=done == 0)
        if done + steps == max_iter:  # the last block: every problem is done
            out_state[:, ids], out_prev[:, ids] = stop, prev
            break
        if bool(stopped.any()):
            gone = stopped.nonzero().squeeze(1)
            out_state[:, ids[gone]] = _select(stop, gone)
            out_prev[:, ids[gone]] = _select(prev, gone)
            keep = (~stopped).nonzero().squeeze(1)
            if len(keep) == 0:
                break
            form, ids, state = form.take(keep), ids[keep], _select(state, keep)
    return out_state, out_prev


def _block(
    form: _Scaling | _LogDomain, state: Tensor, *, steps: int, first: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`steps` iterations from `state`, all kept: (the state at each problem's first stop, or
    at the last iteration if it did not stop; the state before it; stopped [P]; the last
    state). `first`: `state` is the reference's start."""
    states = [state]
    for _ in range(steps):
        states.append(form.step(states[-1]))
    history = torch.stack(states)  # [steps + 1, N, P]
    stops = form.stops(history, first=first)  # [steps, P]
    first_stop = (stops.cumsum(dim=0) == 0).sum(dim=0)  # iterations before the first stop [P]
    index = first_stop.clamp_max(steps - 1).expand(1, *history.shape[1:])
    stop = history.gather(0, index + 1).squeeze(0)
    prev = history.gather(0, index).squeeze(0)
    return stop, prev, first_stop < steps, history[-1]


def _in_range(state: Tensor) -> Tensor:
    """[P]: every v~ of a problem [N, P] is finite and positive."""
    return (torch.isfinite(state) & (state > 0)).all(dim=0)


@dataclass(frozen=True)
class _Problems:
    """The problems of one `sinkhorn` call, laid out [N, P, M] (P problems)."""

    log_kernel: Tensor  # log K~ = -C~ / eps <= 0, with a 0 in every column [N, P, M]
    lowest: Tensor  # min log K~ [P]
    shift: Tensor  # c / eps [N, P]
    a: float
    b: float
    thresh: float
    capped: bool  # partial transport (T 1 <= a); False: balanced (T 1 = a)

    def _parts(self, ids: Tensor | None) -> tuple[Tensor, Tensor]:
        if ids is None:
            return self.log_kernel, self.shift
        return _select(self.log_kernel, ids), _select(self.shift, ids)

    def scaling_form(self, ids: Tensor | None, *, buffered: bool) -> _Scaling:
        log_kernel, shift = self._parts(ids)
        limit = shift.shape[0] * self.thresh
        kernel, scale = log_kernel.exp(), shift.double().exp()
        return _Scaling(kernel, scale, self.a, self.b, limit, self.capped, buffered)

    def log_form(self, ids: Tensor | None) -> _LogDomain:
        log_kernel, shift = self._parts(ids)
        return _LogDomain(
            log_kernel,
            shift,
            log_a=math.log(self.a),
            log_b=math.log(self.b),
            log_thresh=math.log(self.thresh),
            floor=math.log(torch.finfo(log_kernel.dtype).tiny) + 1.0,
            capped=self.capped,
        )

    def in_scaling_range(self) -> Tensor:
        """[P]: whether the scaling form is used: K~ and the start v~ = e^{-c / eps} within
        tiny^(+-_SCALING_RANGE), e^{c / eps} <= float64 max^_SHIFT_RANGE (module docstring);
        balanced, also e^{-c / eps} >= tiny^_SCALING_RANGE (the start is not raised)."""
        reach = -_SCALING_RANGE * math.log(torch.finfo(self.log_kernel.dtype).tiny)
        top_shift = _SHIFT_RANGE * math.log(torch.finfo(torch.float64).max)
        top_shift = top_shift if self.capped else min(top_shift, reach)
        return (
            (self.lowest >= -reach)
            & (self.shift.amin(dim=0) >= -reach)
            & (self.shift.amax(dim=0) <= top_shift)
        )


def _plans_split(problems: _Problems, *, max_iter: int, block: int) -> Tensor:
    """Plans [N, P, M], each problem solved in the form its range picks (host syncs)."""
    scaling = problems.in_scaling_range()
    rest = (~scaling).nonzero().squeeze(1)  # the log domain's problems
    plan = None
    if bool(scaling.any()):
        ids = scaling.nonzero().squeeze(1)
        every = len(ids) == len(scaling)
        form = problems.scaling_form(None if every else ids, buffered=True)
        v, v_prev = _solve(form, max_iter=max_iter, block=block)
        ok = _in_range(v) & _in_range(v_prev)
        if every and bool(ok.all()):
            return form.plan(v, v_prev)
        plan = torch.empty_like(problems.log_kernel)
        good = ok.nonzero().squeeze(1)
        plan[:, ids[good]] = form.take(good).plan(_select(v, good), _select(v_prev, good))
        rest = torch.cat([rest, ids[~ok]])
    if plan is None:  # every problem in the log domain
        form = problems.log_form(None)
        return form.plan(*_solve(form, max_iter=max_iter, block=block))
    if len(rest):
        form = problems.log_form(rest)
        plan[:, rest] = form.plan(*_solve(form, max_iter=max_iter, block=block))
    return plan


def _plans_both(problems: _Problems, *, max_iter: int, buffered: bool) -> Tensor:
    """Plans [N, P, M] with no host sync: both forms for every problem, each problem taking the
    one its range picks."""
    fast = problems.scaling_form(None, buffered=buffered)
    v, v_prev = _solve(fast, max_iter=max_iter, block=0)
    scaling = problems.in_scaling_range() & _in_range(v) & _in_range(v_prev)
    form = problems.log_form(None)
    plan = form.plan(*_solve(form, max_iter=max_iter, block=0))
    return torch.where(scaling.unsqueeze(-1), fast.plan(v, v_prev), plan)


def sinkhorn(
    cost: Tensor,
    *,
    eps: float = 0.1,
    top_percent: float = 0.8,
    max_iter: int = 100,
    thresh: float = 1e-3,
    check_every: int = 0,
    balanced: bool = False,
) -> Tensor:
    """Entropic partial OT plan [..., M, N] for costs [..., M, N] (see the module docstring).

    eps: entropic regularisation (K = exp(-C / eps)); top_percent: total mass moved, in (0, 1];
    max_iter: iterations at most; thresh: stop a problem once mean_n |v_n - v_prev_n| < thresh
    (v = e^g, the reference's scaling); check_every: 0 never syncs with the host; k > 0 checks
    every k iterations which problems have stopped and iterates only the others (same result;
    ignored under vmap/grad); balanced: the balanced problem T 1 = a (plain Sinkhorn, PLOT's),
    which needs top_percent = 1. Column sums are top_percent / N; row sums <= 1 / M (balanced:
    = 1 / M) at convergence. Finite for every finite cost and eps > 0. Each problem's plan is
    the same bit for bit whatever else is in the batch. Carries no gradient.
    """
    if eps <= 0 or not 0 < top_percent <= 1 or max_iter < 1 or thresh <= 0:
        raise ValueError(
            f"sinkhorn needs eps > 0, 0 < top_percent <= 1, max_iter >= 1, thresh > 0; got "
            f"eps={eps}, top_percent={top_percent}, max_iter={max_iter}, thresh={thresh}"
        )
    if balanced and top_percent != 1:
        raise ValueError(f"balanced transport moves all the mass: top_percent=1, not {top_percent}")
    n_rows, n_cols = cost.shape[-2], cost.shape[-1]
    work = cost.detach()
    if work.dtype not in (torch.float32, torch.float64):
        work = work.float()
    with torch.no_grad():
        costs = work.reshape(-1, n_rows, n_cols).permute(2, 0, 1).contiguous()  # [N, P, M]
        col_min, col_max = torch.aminmax(costs, dim=-1)  # [N, P]  c_n and max_m C_mn
        problems = _Problems(
            log_kernel=(col_min.unsqueeze(-1) - costs).mul_(1.0 / eps),
            lowest=(col_min - col_max).mul_(1.0 / eps).amin(dim=0),
            shift=col_min.mul_(1.0 / eps),
            a=1.0 / n_rows,
            b=top_percent / n_cols,
            thresh=thresh,
            capped=not balanced,
        )
        if costs.shape[1] == 0:
            plan = costs
        elif check_every > 0 and _may_sync(work):
            plan = _plans_split(problems, max_iter=max_iter, block=check_every)
        else:
            plan = _plans_both(problems, max_iter=max_iter, buffered=_may_sync(work))
    plan = plan.permute(1, 2, 0).contiguous().reshape(cost.shape)  # [..., M, N]
    return plan.to(cost.dtype)
