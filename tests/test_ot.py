"""Unbalanced Sinkhorn: marginals, hand values, the reference's iterates, batching, vmap."""

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
