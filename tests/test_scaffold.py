"""SCAFFOLD (option II) against its paper's equations, written here from Algorithm 1:
the hooks on small tensors, the driver's local step and round end, --resume of its state, and
its privacy (the control variates are post-processing: same budget and noise as FedAvg)."""

import pytest
import torch

from fpl_bench.driver import FederatedRun, NoisePlan, Schedule
from fpl_bench.method import method_from_name
from fpl_bench.schemes._base import RoundEnd
from fpl_bench.schemes.scaffold import Scaffold
from tests.test_driver import make_federation


def test_hooks_follow_algorithm_1_option_2():
    scheme = Scaffold()
    x = {"prompt": torch.tensor([[1.0, -2.0]])}
    c_i, c = scheme.init_state(x)
    assert torch.equal(c_i["c.prompt"], torch.zeros(1, 2)) and torch.equal(
        c["c.prompt"], c_i["c.prompt"]
    )

    c_i = {"c.prompt": torch.tensor([[0.5, 0.25]])}
    c = {"c.prompt": torch.tensor([[-1.0, 2.0]])}
    g = {"prompt": torch.tensor([[3.0, 4.0]])}
    # line 10: y <- y - lr (g - c_i + c): the applied gradient is g - c_i + c
    corrected = scheme.correct_grads(g, c_i, c)
    assert torch.equal(corrected["prompt"], torch.tensor([[3.0 - 0.5 - 1.0, 4.0 - 0.25 + 2.0]]))

    # option II: c_i+ = c_i - c + (x - y) / (K lr), K = 4 steps, lr = 0.5
    y = {"prompt": torch.tensor([[0.0, 0.0]])}
    new, sent = scheme.client_round_end(RoundEnd(start=x, end=y, steps=4, lr=0.5), c_i, c)
    want = torch.tensor([[0.5 + 1.0 + 1.0 / 2.0, 0.25 - 2.0 + (-2.0) / 2.0]])
    torch.testing.assert_close(new["c.prompt"], want)
    torch.testing.assert_close(sent["c.prompt"], want - c_i["c.prompt"])
    # with client momentum beta, over the effective step K lr / (1 - beta)
    done = RoundEnd(start=x, end=y, steps=4, lr=0.5, momentum=0.75)
    new, _ = scheme.client_round_end(done, c_i, c)
    want = torch.tensor([[0.5 + 1.0 + 0.25 * 1.0 / 2.0, 0.25 - 2.0 + 0.25 * (-2.0) / 2.0]])
    torch.testing.assert_close(new["c.prompt"], want)

    # line 17: c <- c + (1 / N) sum over the round's clients of dc_i, N = 4 clients in all
    d1, d2 = {"c.prompt": torch.tensor([[1.0, 2.0]])}, {"c.prompt": torch.tensor([[3.0, -6.0]])}
    server = scheme.server_round_end(c, [d1, d2], n_clients=4)
    torch.testing.assert_close(server["c.prompt"], torch.tensor([[-1.0 + 1.0, 2.0 - 1.0]]))


def one_step_run(tower, name, fed, **kw):
    """Plain SGD (no momentum), one local step per round (the batch holds every example)."""
    sched = Schedule(rounds=2, batch_size=1000, lr=0.1, momentum=0.0)
    return FederatedRun(method_from_name(name), tower, fed, schedule=sched, seed=0, **kw)


def test_driver_round_end_and_local_step_are_the_papers(tiny_tower):
    fed = make_federation(tiny_tower)
    scaffold, fedavg = (
        one_step_run(tiny_tower, "scaffold", fed),
        one_step_run(tiny_tower, "promptfl", fed),
    )
    x0 = scaffold.server["prompt"].clone()
    scaffold.run_round(0)
    fedavg.run_round(0)
    # Round 1: every variate starts at zero, so the round is FedAvg's, bit for bit...
    assert torch.equal(scaffold.server["prompt"], fedavg.server["prompt"])
    # ...and each c_i = (x - y_i) / (K lr) with K = 1; c = (1 / N) sum_i c_i.
    variates = []
    for state in scaffold.clients:
        want = (x0 - state.params["prompt"]) / (1 * 0.1)
        torch.testing.assert_close(state.state["c.prompt"], want, rtol=1e-5, atol=1e-6)
        variates.append(state.state["c.prompt"])
    torch.testing.assert_close(scaffold.server_state["c.prompt"], sum(variates) / 2)

    # Round 2 from the same x: with one step, y_i = x - lr (g_i(x) - c_i + c), and FedAvg's
    # y_i = x - lr g_i(x) on the same batch, so y_scaffold - y_fedavg = lr (c_i - c).
    fedavg.load_state_dict({**scaffold.state_dict(), "server_state": {}})
    scaffold.run_round(1)
    fedavg.run_round(1)
    c = scaffold.server_state  # updated at the round's end; the round used the old c = mean
    old_c = sum(variates) / 2
    for i, (s, f) in enumerate(zip(scaffold.clients, fedavg.clients, strict=True)):
        gap = s.params["prompt"] - f.params["prompt"]
        torch.testing.assert_close(gap, 0.1 * (variates[i] - old_c), rtol=1e-4, atol=1e-6)
    assert not torch.equal(c["c.prompt"], old_c)


def test_state_survives_a_checkpoint(tiny_tower):
    fed = make_federation(tiny_tower)
    whole = one_step_run(tiny_tower, "scaffold", fed)
    whole.run_round(0)
    saved = whole.state_dict()
    whole.run_round(1)
    resumed = one_step_run(tiny_tower, "scaffold", fed)
    resumed.load_state_dict(saved)
    resumed.run_round(1)
    assert torch.equal(resumed.server["prompt"], whole.server["prompt"])
    assert torch.equal(resumed.server_state["c.prompt"], whole.server_state["c.prompt"])


@pytest.mark.parametrize("trust", ["client", "server"])
def test_private_variates_cost_no_budget_and_read_only_released_values(tiny_tower, trust):
    fed = make_federation(tiny_tower)
    runs = {}
    for name in ("scaffold", "promptfl"):
        run = one_step_run(tiny_tower, name, fed, trust=trust)
        run.enable_privacy(NoisePlan(noise_multiplier=1.0, clip_norm=1.0))
        runs[name] = run
    # the same sampling rates and noisy steps, so the accountant gives the same epsilon
    assert runs["scaffold"].budget() == runs["promptfl"].budget()
    assert runs["scaffold"].placement == runs["promptfl"].placement
    run = runs["scaffold"]
    x0 = run.view(0)["prompt"].clone()
    run.run_round(0)
    for c, state in enumerate(run.clients):
        # y_i is what left the client noised (client trust) or the server's noised value
        # (server trust, every step synchronised): c_i is a function of released values only
        released = run.view(c)["prompt"] if trust == "server" else state.params["prompt"]
        want = (x0 - released) / 0.1
        torch.testing.assert_close(state.state["c.prompt"], want, rtol=1e-5, atol=1e-6)
