"""Partial Sinkhorn: marginals, hand values, the reference's iterates, POT as oracle, float32
range (small eps, wide costs), batching, vmap."""

import math

import pytest
import torch

from fpl_bench.ot import sinkhorn

F64 = torch.float64


def reference_loop(cost, *, eps, top_percent, max_iter, thresh):
    """The reference's iteration for one problem [M, N], written plainly, stopping with `break`."""
    m, n = cost.shape
    kernel = torch.exp(-cost / eps)
    a, b = 1.0 / m, top_percent / n
    u, v = torch.ones(m, dtype=cost.dtype), torch.ones(n, dtype=cost.dtype)
    for _ in range(max_iter):
        v_prev = v
        u = torch.clamp(a / (kernel @ v), max=1.0)
        v = b / (kernel.T @ u)
        if float((v - v_prev).abs().mean()) < thresh:
            break
    return u[:, None] * kernel * v[None, :]


def cosine_like_costs(*shape, seed=0, dtype=F64):
    """1 - cos with cosines around 0.2, as CLIP's patch-text similarities are."""
    gen = torch.Generator().manual_seed(seed)
    return 1.0 - (0.2 + 0.05 * torch.randn(*shape, generator=gen, dtype=dtype))


def uniform_costs(*shape, low, high, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(*shape, generator=gen, dtype=dtype)


# FedOTP's search space for eps (its few-shot script uses 0.01); costs 1 - cos lie in [0, 2].
EPS_GRID = [0.005, 0.01, 0.05, 0.1, 0.5, 1.0]


def test_column_sums_exact_row_sums_capped_total_is_top_percent():
    cost = torch.rand(5, 7, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    plan = sinkhorn(cost, eps=0.1, top_percent=0.8, max_iter=2000, thresh=1e-12)
    torch.testing.assert_close(plan.sum(-2), torch.full((5, 2), 0.4, dtype=F64))
    assert (plan.sum(-1) <= 1 / 7 + 1e-9).all()
    torch.testing.assert_close(plan.sum((-2, -1)), torch.full((5,), 0.8, dtype=F64))
    assert (plan > 0).all()


def test_uniform_cost_gives_uniform_plan_scaled_by_top_percent():
    # K uniform -> u = 1 and v = b / (M k): T = top_percent / (M N) in every cell.
    plan = sinkhorn(torch.full((4, 2), 0.3), top_percent=0.5)
    torch.testing.assert_close(plan, torch.full((4, 2), 0.5 / 8))


def test_partial_plan_fills_the_cheapest_patches_up_to_their_cap():
    # One prompt, three patches with cap 1/3 each, mass 0.9 to place: the two free patches
    # (cost 0) are filled to 1/3, the expensive one (cost 1) takes the remaining 0.9 - 2/3.
    cost = torch.tensor([[0.0], [0.0], [1.0]], dtype=F64)
    plan = sinkhorn(cost, eps=0.1, top_percent=0.9, max_iter=5000, thresh=1e-12)
    expected = torch.tensor([[1 / 3], [1 / 3], [0.9 - 2 / 3]], dtype=F64)
    torch.testing.assert_close(plan, expected, rtol=0, atol=1e-6)
    # Below the caps the plan is proportional to K: mass 0.5 over two patches with cap 1/2 and
    # costs [0, 0.1] -> K = [1, e^-1], T = 0.5 K / sum(K) = [0.366, 0.134].
    cost = torch.tensor([[0.0], [0.1]], dtype=F64)
    plan = sinkhorn(cost, eps=0.1, top_percent=0.5, max_iter=100, thresh=1e-12)
    k = torch.tensor([[1.0], [math.exp(-1)]], dtype=F64)
    torch.testing.assert_close(plan, 0.5 * k / k.sum())


@pytest.mark.parametrize("eps", [0.1, 0.01])
def test_frozen_batch_equals_the_reference_loop_with_break(eps):
    cost = cosine_like_costs(6, 64, 2, seed=1)
    plan = sinkhorn(cost, eps=eps, top_percent=0.8, max_iter=100, thresh=1e-3)
    for c, p in zip(cost, plan, strict=True):
        expected = reference_loop(c, eps=eps, top_percent=0.8, max_iter=100, thresh=1e-3)
        torch.testing.assert_close(p, expected, rtol=1e-10, atol=1e-14)


def test_small_eps_does_not_underflow_in_float32():
    # exp(-C / 0.005) underflows float32 for C ~ 0.8; the column-rescaled kernel does not.
    cost = cosine_like_costs(4, 64, 2, seed=2, dtype=torch.float32)
    plan = sinkhorn(cost, eps=0.005)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(-2), torch.full((4, 2), 0.4))


def test_batched_equals_one_by_one_and_vmap():
    cost = cosine_like_costs(3, 4, 16, 2, seed=3, dtype=torch.float32)  # [images, classes, M, N]
    batched = sinkhorn(cost)
    looped = torch.stack([torch.stack([sinkhorn(c) for c in per_image]) for per_image in cost])
    torch.testing.assert_close(batched, looped, rtol=1e-6, atol=0)
    mapped = torch.func.vmap(torch.func.vmap(sinkhorn))(cost)
    torch.testing.assert_close(mapped, batched, rtol=1e-6, atol=0)


def test_early_exit_gives_the_same_plan_as_running_max_iter():
    cost = cosine_like_costs(8, 6, 32, 2, seed=4, dtype=torch.float32)
    full = sinkhorn(cost, check_every=0)
    for every in (1, 5, 7):
        torch.testing.assert_close(sinkhorn(cost, check_every=every), full, rtol=0, atol=0)
    # a converged problem stays as it was however many more iterations are allowed
    torch.testing.assert_close(sinkhorn(cost, max_iter=1000), full, rtol=0, atol=0)


def test_plan_carries_no_gradient_and_vmap_grad_sees_it_as_a_constant():
    cost = cosine_like_costs(5, 16, 2, seed=5, dtype=torch.float32).requires_grad_(True)
    plan = sinkhorn(cost)
    assert not plan.requires_grad

    def transport_cost(c):
        return (sinkhorn(c) * c).sum()

    grads = torch.func.vmap(torch.func.grad(transport_cost))(cost.detach())
    torch.testing.assert_close(grads, plan)


def test_half_precision_cost_is_solved_in_float32():
    cost = cosine_like_costs(2, 16, 2, seed=6, dtype=torch.float32)
    plan = sinkhorn(cost.half())
    assert plan.dtype == torch.float16
    torch.testing.assert_close(plan.float(), sinkhorn(cost.half().float()), rtol=1e-3, atol=1e-6)


def test_bad_arguments_are_rejected():
    cost = torch.zeros(3, 2)
    for kwargs in ({"eps": 0.0}, {"top_percent": 0.0}, {"top_percent": 1.5}, {"max_iter": 0}):
        with pytest.raises(ValueError, match="sinkhorn needs"):
            sinkhorn(cost, **kwargs)


@pytest.mark.parametrize("eps", EPS_GRID)
@pytest.mark.parametrize(("low", "high", "tol"), [(0.0, 2.0, 1e-5), (-5.0, 5.0, 1e-4)])
def test_float32_plan_is_finite_with_exact_columns_for_small_eps_and_wide_costs(
    eps, low, high, tol
):
    # The scaling form gave inf/NaN plans here (on [0, 2]: 1 of these 32 at eps 0.01, 30 at
    # 0.005; on [-5, 5] all 32 at eps <= 0.05): rows of K underflowed and u or v overflowed.
    cost = uniform_costs(32, 64, 2, low=low, high=high, seed=0, dtype=torch.float32)
    plan = sinkhorn(cost, eps=eps, top_percent=0.8)  # FedOTP's call: max_iter 100, thresh 1e-3
    assert torch.isfinite(plan).all() and (plan >= 0).all()
    torch.testing.assert_close(plan.sum(-2), torch.full((32, 2), 0.4), rtol=2e-4, atol=0)
    # The same 100 iterations in float64 (thresh 1e-300: no problem stops early), entries <= 0.03.
    # Float32 holds log K ~ -(high - low) / eps, up to 2000 here, to ~1e-4 of a unit, so `tol`:
    # measured 1.4e-6 on [0, 2] and 2e-5 on [-5, 5] (at eps <= 0.01).
    exact = sinkhorn(cost.double(), eps=eps, top_percent=0.8, thresh=1e-300)
    fast = sinkhorn(cost, eps=eps, top_percent=0.8, thresh=1e-300)
    torch.testing.assert_close(fast.double(), exact, rtol=0, atol=tol)


@pytest.mark.parametrize(("shift", "tol"), [(-5.0, 1e-4), (5.0, 1e-5)])
def test_float32_follows_the_reference_where_its_scalings_leave_float32_range(shift, tol):
    # At eps 0.01, costs ~0.8 + 5 give v ~ e^580 (the stopping rule's v: it never fires, as
    # |dv| ~ e^580 * rounding) and costs ~0.8 - 5 give u ~ e^-420. Float64 holds both, so the
    # reference loop runs there (on the float32-rounded costs) and float32 must take the same
    # iterations to the same plan, within tol of the largest entry: 1e-5, or 1e-4 where the
    # potential log u ~ -420 itself is only held to float32's ~3e-5 there.
    cost = cosine_like_costs(4, 16, 2, seed=8, dtype=torch.float32) + shift
    plan = sinkhorn(cost, eps=0.01, top_percent=0.8)
    assert torch.isfinite(plan).all()
    for c, p in zip(cost.double(), plan, strict=True):
        expected = reference_loop(c, eps=0.01, top_percent=0.8, max_iter=100, thresh=1e-3)
        torch.testing.assert_close(p.double(), expected, rtol=0, atol=tol * float(expected.max()))


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.5])
def test_float32_plan_equals_the_float64_reference_loop_at_moderate_eps(eps):
    # What FedOTP runs (float32, eps 0.1) is the old algorithm's plan to float32 tolerance:
    # max error <= 1e-5 of the largest entry (measured ~1e-6; the scaling form gave ~5e-7).
    cost = cosine_like_costs(6, 64, 2, seed=9)
    plan = sinkhorn(cost.float(), eps=eps, top_percent=0.8)
    for c, p in zip(cost, plan, strict=True):
        expected = reference_loop(c, eps=eps, top_percent=0.8, max_iter=100, thresh=1e-3)
        torch.testing.assert_close(p.double(), expected, rtol=0, atol=1e-5 * float(expected.max()))


@pytest.mark.parametrize("eps", EPS_GRID)
def test_converged_plan_equals_pots_entropic_partial_wasserstein(eps):
    # Same problem (see the module docstring): min <C, T> + eps sum T log T subject to
    # T 1 <= a, T^T 1 <= b, 1^T T 1 = m = sum(b), solved by Dykstra's projections in log domain.
    # Both run to convergence in float64 and agree to 1e-9 absolute (entries ~0.1; measured
    # ~3e-12), so each checks the other's iteration; the row caps hold too.
    ot = pytest.importorskip("ot")
    pot_partial = getattr(ot.partial, "entropic_partial_wasserstein_logscale", None)
    if pot_partial is None:
        pytest.skip("POT >= 0.9.6 has entropic_partial_wasserstein_logscale")
    for n_prompts, top_percent, seed in [(2, 0.8, 0), (2, 0.5, 1), (3, 0.9, 2)]:
        cost = uniform_costs(6, n_prompts, low=0.6, high=1.0, seed=seed)  # 1 - cos, cos in [0, .4]
        plan = sinkhorn(
            cost, eps=eps, top_percent=top_percent, max_iter=5000, thresh=1e-300, check_every=10
        )  # to the float64 fixed point
        a = torch.full((6,), 1 / 6, dtype=F64)
        b = torch.full((n_prompts,), top_percent / n_prompts, dtype=F64)
        expected = pot_partial(
            a.numpy(),
            b.numpy(),
            cost.numpy(),
            reg=eps,
            m=float(b.sum()),
            numItermax=5000,
            stopThr=1e-11,
        )
        torch.testing.assert_close(plan, torch.from_numpy(expected), rtol=0, atol=1e-9)
        assert (plan.sum(-1) <= a + 1e-12).all()


@pytest.mark.parametrize("eps", [0.01, 0.1])
def test_vmap_equals_batched_for_wide_costs_with_early_exit_requested(eps):
    # FedOTP passes check_every=5 also under vmap (per-sample DP gradients), where it is ignored.
    cost = uniform_costs(3, 4, 16, 2, low=-5.0, high=5.0, seed=10, dtype=torch.float32)
    batched = sinkhorn(cost, eps=eps, check_every=5)
    assert torch.isfinite(batched).all()

    def solve(c):
        return sinkhorn(c, eps=eps, check_every=5)

    mapped = torch.func.vmap(torch.func.vmap(solve))(cost)
    torch.testing.assert_close(mapped, batched, rtol=1e-6, atol=0)


def _mixed_costs(n_problems, seed):
    """[P, 49, 2] float32: cosine-like costs (the scaling form) and, every third problem, wide
    costs at eps 0.1 (log K~ down to -100: the log domain)."""
    cost = cosine_like_costs(n_problems, 49, 2, seed=seed, dtype=torch.float32)
    wide = uniform_costs(n_problems, 49, 2, low=0.0, high=10.0, seed=seed, dtype=torch.float32)
    cost[::3] = wide[::3]
    return cost


@pytest.mark.parametrize("check_every", [0, 5])
def test_a_problems_plan_is_the_same_bit_for_bit_whatever_else_is_in_the_batch(check_every):
    # 49 patches: sizes whose vectorised loops end in scalar tails at every batch size.
    cost = _mixed_costs(64, seed=11)
    full = sinkhorn(cost, check_every=check_every)
    gen = torch.Generator().manual_seed(0)
    for size in (1, 3, 8, 9, 17, 40):
        ids = torch.randperm(64, generator=gen)[:size]
        assert torch.equal(sinkhorn(cost[ids], check_every=check_every), full[ids]), size
    assert torch.equal(sinkhorn(cost, check_every=5 - check_every), full)  # frozen = compacting


def test_scaling_form_and_log_domain_give_the_same_plans(monkeypatch):
    # The same iterates in two forms: in float64 they agree to rounding (and stop together).
    cost = cosine_like_costs(16, 49, 2, seed=12)
    for eps in (0.05, 0.1, 0.5):
        scaling = sinkhorn(cost, eps=eps, check_every=5)
        with monkeypatch.context() as patch:
            patch.setattr("fpl_bench.ot._SCALING_RANGE", 0.0)  # no problem qualifies
            log_domain = sinkhorn(cost, eps=eps, check_every=5)
        torch.testing.assert_close(scaling, log_domain, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("check_every", [0, 5])
def test_a_scaling_form_problem_out_of_range_is_solved_again_in_the_log_domain(
    monkeypatch, check_every
):
    from fpl_bench import ot

    cost = cosine_like_costs(12, 49, 2, seed=13, dtype=torch.float32)
    scaling = sinkhorn(cost, check_every=check_every)
    with monkeypatch.context() as patch:
        patch.setattr(ot, "_SCALING_RANGE", 0.0)
        log_domain = sinkhorn(cost, check_every=check_every)
    in_range = ot._in_range

    def odd_out_of_range(state):  # as if every other problem's v~ had overflowed
        ok = in_range(state)
        ok[1::2] = False
        return ok

    monkeypatch.setattr(ot, "_in_range", odd_out_of_range)
    mixed = sinkhorn(cost, check_every=check_every)
    assert torch.equal(mixed[::2], scaling[::2]) and torch.equal(mixed[1::2], log_domain[1::2])
