"""FedYogi against Algorithm 2 of its paper (Yogi variant), transcribed here: two server rounds
on small tensors (both signs of v - Delta^2), the driver's first round by hand from FedAvg's
aggregate and its second from the aggregate the server received, --resume of the moments of
both server optimizers, and a run by name without DP and under DP with both trust models."""

import pytest
import torch
from torch import Tensor

from fpl_bench.driver import FederatedRun, Schedule
from fpl_bench.method import method_from_name
from fpl_bench.schemes.fedadam import FedAdam
from fpl_bench.schemes.fedyogi import FedYogi
from tests.test_driver import make_federation


def paper_yogi(
    x: Tensor, deltas: list[Tensor], *, eta: float, beta1: float, beta2: float, tau: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Algorithm 2 of Reddi et al. (2021), Yogi, from m_0 = v_0 = 0: (x, m, v) after one round
    per pseudo-gradient Delta_t in `deltas`."""
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    for delta in deltas:
        m = beta1 * m + (1 - beta1) * delta
        v = v - (1 - beta2) * delta * delta * torch.sign(v - delta * delta)
        x = x + eta * m / (torch.sqrt(v) + tau)
    return x, m, v


HYPER = {"eta": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 0.001}


def yogi(hyper: dict[str, float]) -> FedYogi:
    return FedYogi(
        server_lr=hyper["eta"], beta1=hyper["beta1"], beta2=hyper["beta2"], tau=hyper["tau"]
    )


def test_two_server_rounds_are_the_papers_yogi():
    scheme = yogi(HYPER)
    x0 = torch.tensor([1.0, -1.0, 0.5, 0.0])
    # round 2 has |Delta| below sqrt(v_1) in the first entry (v shrinks), above it in the
    # second and third (v grows), and zero in the last, which stays at x0
    deltas = [torch.tensor([0.5, 0.1, -0.2, 0.0]), torch.tensor([0.01, -0.4, 0.3, 0.0])]
    x, state = x0, {}
    for t, delta in enumerate(deltas, start=1):
        x, state = scheme.server_update({"prompt": x}, {"prompt": x + delta}, state)
        x = x["prompt"]
        want_x, want_m, want_v = paper_yogi(x0, deltas[:t], **HYPER)
        torch.testing.assert_close(x, want_x)
        torch.testing.assert_close(state["m.prompt"], want_m)
        torch.testing.assert_close(state["v.prompt"], want_v)
    v1 = (1 - HYPER["beta2"]) * deltas[0].pow(2)
    assert state["v.prompt"][0] < v1[0] and (state["v.prompt"][1:3] > v1[1:3]).all()
    assert x[3] == 0.0


def test_round_one_equals_fedadams_round_two_does_not():
    adam = FedAdam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.001)
    x = {"prompt": torch.tensor([1.0, -1.0])}
    y1, y2 = {"prompt": torch.tensor([1.5, -0.8])}, {"prompt": torch.tensor([1.0, 0.0])}
    (a1, adam_state), (g1, yogi_state) = (s.server_update(x, y1, {}) for s in (adam, yogi(HYPER)))
    assert torch.equal(a1["prompt"], g1["prompt"]) and torch.equal(
        adam_state["v.prompt"], yogi_state["v.prompt"]
    )
    a2, _ = adam.server_update(a1, y2, adam_state)
    g2, _ = yogi(HYPER).server_update(g1, y2, yogi_state)
    assert not torch.allclose(a2["prompt"], g2["prompt"])


def test_v_equal_to_delta_squared_stays():
    scheme = FedYogi(server_lr=0.1, beta1=0.0, beta2=0.5, tau=0.0)
    v, delta = torch.tensor([0.25, 4.0]), torch.tensor([0.5, -2.0])
    assert torch.equal(scheme.second_moment(v, delta), v)


def test_through_the_driver_the_server_steps_yogi_on_the_aggregates(tiny_tower, monkeypatch):
    fed = make_federation(tiny_tower)
    sched = Schedule(rounds=2, batch_size=8, lr=0.1)
    run = FederatedRun(method_from_name("fedyogi"), tiny_tower, fed, schedule=sched, seed=0)
    fedavg = FederatedRun(method_from_name("promptfl"), tiny_tower, fed, schedule=sched, seed=0)
    received: list[Tensor] = []
    real = FedYogi.server_update

    def recording(self, params, mean, state):
        received.append(mean["prompt"] - params["prompt"])  # Delta_t as the server sees it
        return real(self, params, mean, state)

    monkeypatch.setattr(FedYogi, "server_update", recording)
    x0 = run.server["prompt"].clone()
    run.run_round(0)
    fedavg.run_round(0)
    s = run.method.scheme
    hyper = {"eta": s.server_lr, "beta1": s.beta1, "beta2": s.beta2, "tau": s.tau}
    # round 1 by hand: the clients' round is FedAvg's, so Delta_1 = FedAvg's aggregate - x0
    torch.testing.assert_close(received[0], fedavg.server["prompt"] - x0)
    want, _, want_v = paper_yogi(x0, [fedavg.server["prompt"] - x0], **hyper)
    torch.testing.assert_close(run.server["prompt"], want)
    torch.testing.assert_close(run.server_state["v.prompt"], want_v)
    run.run_round(1)
    want, want_m, want_v = paper_yogi(x0, received, **hyper)
    torch.testing.assert_close(run.server["prompt"], want)
    torch.testing.assert_close(run.server_state["m.prompt"], want_m)
    torch.testing.assert_close(run.server_state["v.prompt"], want_v)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_resume_between_rounds_continues_the_server_optimizer_bit_for_bit(tiny_tower, name):
    fed = make_federation(tiny_tower)
    sched = Schedule(rounds=2, batch_size=8, lr=0.1)
    runs = [
        FederatedRun(method_from_name(name), tiny_tower, fed, schedule=sched, seed=0)
        for _ in range(2)
    ]
    runs[0].run_round(0)
    runs[1].load_state_dict(runs[0].state_dict())
    for run in runs:
        run.run_round(1)
    first, resumed = runs
    assert set(resumed.server_state) == {"m.prompt", "v.prompt"}
    for key in ("m.prompt", "v.prompt"):
        assert torch.equal(resumed.server_state[key], first.server_state[key]), key
    assert torch.equal(resumed.server["prompt"], first.server["prompt"])
