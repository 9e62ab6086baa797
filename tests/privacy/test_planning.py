"""Privacy planning and noise placement as pure functions: one sigma for heterogeneous clients
and client sampling, and where each trust model puts the noise."""

import pytest

from fpl_bench.privacy.accountant import epsilon_spent, plan_privacy
from fpl_bench.privacy.placement import place_noise
from fpl_bench.privacy.planning import client_budgets, plan_for_clients, steps_per_round


def test_client_budgets_count_rounds_in_and_steps_per_client():
    # client 0: 40 examples, client 1: 100 examples; batch 20, 2 local epochs
    schedule = [[0, 1], [1], [1], [0]]  # fraction < 1: client 0 in 2 rounds, client 1 in 3
    budgets = client_budgets([40, 100], batch_size=20, local_epochs=2, schedule=schedule)
    assert budgets == [(0.5, 2 * 2 * 2), (0.2, 3 * 2 * 5)]
    assert steps_per_round(100, batch_size=20, local_epochs=2) == 10


def test_one_sigma_meets_every_clients_budget_and_reports_the_worst():
    budgets = [(0.5, 8), (0.2, 30), (0.05, 400), (0.3, 0)]  # the last never trains
    led = plan_for_clients(budgets, eps=0.8, delta=1e-5, clip_norm=1.0, rounds=4, calibration="rdp")
    spent = [
        epsilon_spent(noise_multiplier=led.noise_multiplier, sample_rate=q, steps=s, delta=1e-5)
        for q, s in budgets
        if s
    ]
    assert max(spent) <= 0.8 and led.eps_spent == pytest.approx(max(spent))
    # the client needing the most noise sets sigma: it equals that client's own calibration
    alone = [
        plan_privacy(eps=0.8, delta=1e-5, clip_norm=1.0, sample_rate=q, steps=s, rounds=4)
        for q, s in budgets
        if s
    ]
    assert led.noise_multiplier == max(a.noise_multiplier for a in alone)
    with pytest.raises(ValueError, match="no client"):
        plan_for_clients([(0.5, 0)], eps=1, delta=1e-5, clip_norm=1, rounds=1, calibration="rdp")


@pytest.mark.parametrize("sync", ["round", "step"])
def test_trust_models_place_noise_alike_for_every_scheme(sync):
    steps, shared = ["sigma", "U", "V"], ["sigma"]
    server = place_noise(
        step_names=steps, shared=shared, scheme_sync=sync, trust="server", private=True
    )
    assert server.sync == "step" and server.server == ("sigma",)
    assert server.client == ("U", "V")
    client = place_noise(
        step_names=steps, shared=shared, scheme_sync=sync, trust="client", private=True
    )
    assert client.sync == sync and client.server == () and client.client == tuple(steps)
    plain = place_noise(
        step_names=steps, shared=shared, scheme_sync=sync, trust="server", private=False
    )
    assert plain.sync == sync and plain.server == plain.client == ()
    local = place_noise(
        step_names=["prompt"], shared=[], scheme_sync="round", trust="server", private=True
    )
    assert local.sync == "round" and local.client == ("prompt",)


def test_delta_at_or_above_one_over_n_is_refused_naming_the_largest_sensible_value():
    from fpl_bench.errors import UsageError
    from fpl_bench.privacy.planning import check_delta

    check_delta(1e-5, [64, 200])
    with pytest.raises(UsageError, match=r"smallest client \(64 training examples\)"):
        check_delta(1 / 64, [64, 200])
    with pytest.raises(UsageError, match=r"1/n = 0\.0156"):
        check_delta(0.05, [200, 64])


def test_check_epsilons_refuses_a_budget_above_any_clients_largest_supported():
    from fpl_bench.errors import UsageError
    from fpl_bench.privacy.accountant import max_supported_epsilon
    from fpl_bench.privacy.planning import check_epsilons

    budgets = [(1.0, 2), (0.25, 40), (0.5, 0)]  # the last never trains
    smallest = min(
        max_supported_epsilon(sample_rate=q, steps=s, delta=1e-5) for q, s in budgets[:2]
    )
    check_epsilons([None, 1.0, smallest], budgets, delta=1e-5, calibration="rdp")
    with pytest.raises(UsageError, match="sample rate 1, 2 noisy steps"):
        check_epsilons([1.0, smallest * 1.01], budgets, delta=1e-5, calibration="paper")
