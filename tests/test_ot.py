"""Partial Sinkhorn: marginals, hand values, batching and vmap."""

import torch

from fpl_bench.ot import partial_sinkhorn


def test_marginals_columns_exact_rows_bounded():
    cost = torch.rand(5, 7, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plan = partial_sinkhorn(cost, eps=0.1, top_percent=0.8, max_iter=1000, thresh=1e-12)
    torch.testing.assert_close(plan.sum(-2), torch.full((5, 2), 0.4, dtype=torch.float64))
    assert (plan.sum(-1) <= 1 / 7 + 1e-9).all()
    assert abs(float(plan.sum()) - 5 * 0.8) < 1e-9


def test_uniform_cost_gives_uniform_plan():
    plan = partial_sinkhorn(torch.full((4, 2), 0.3), top_percent=0.5)
    torch.testing.assert_close(plan, torch.full((4, 2), 0.5 / 8))


def test_batched_equals_loop_and_vmap():
    cost = torch.rand(3, 6, 2, generator=torch.Generator().manual_seed(1))
    batched = partial_sinkhorn(cost)
    looped = torch.stack([partial_sinkhorn(c) for c in cost])
    torch.testing.assert_close(batched, looped)
    mapped = torch.func.vmap(lambda c: partial_sinkhorn(c))(cost)
    torch.testing.assert_close(mapped, batched)


def test_early_exit_does_not_change_a_converged_plan():
    cost = torch.rand(8, 6, 2, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        partial_sinkhorn(cost, check_every=5), partial_sinkhorn(cost, check_every=0)
    )
