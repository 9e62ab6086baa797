"""FedAdam against Algorithm 2 of its paper (Adam variant), written here: the server update on
small tensors over two rounds, and through the driver: the clients' round is FedAvg's, the
server steps along the pseudo-gradient, and its moments survive a checkpoint."""

import math

import torch

from fpl_bench.driver import FederatedRun, Schedule
from fpl_bench.method import method_from_name
from fpl_bench.schemes.fedadam import FedAdam
from tests.test_driver import make_federation


def test_server_update_is_adam_on_the_pseudo_gradient():
    scheme = FedAdam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.001)
    x = {"prompt": torch.tensor([1.0, -1.0])}
    y1 = {"prompt": torch.tensor([1.5, -1.0])}  # the aggregate of round 1
    new, state = scheme.server_update(x, y1, {})
    d = [0.5, 0.0]
    m = [0.1 * d[0], 0.0]
    v = [0.01 * d[0] ** 2, 0.0]
    want = [1.0 + 0.1 * m[0] / (math.sqrt(v[0]) + 0.001), -1.0]
    torch.testing.assert_close(new["prompt"], torch.tensor(want))
    torch.testing.assert_close(state["m.prompt"], torch.tensor(m))
    torch.testing.assert_close(state["v.prompt"], torch.tensor(v))
    y2 = {"prompt": new["prompt"] - torch.tensor([0.2, 0.4])}  # round 2: Delta = (-0.2, -0.4)
    new2, state2 = scheme.server_update(new, y2, state)
    m2 = [0.9 * m[0] + 0.1 * -0.2, 0.1 * -0.4]
    v2 = [0.99 * v[0] + 0.01 * 0.04, 0.01 * 0.16]
    want2 = [w + 0.1 * a / (math.sqrt(b) + 0.001) for w, a, b in zip(want, m2, v2, strict=True)]
    torch.testing.assert_close(new2["prompt"], torch.tensor(want2))
    torch.testing.assert_close(state2["v.prompt"], torch.tensor(v2))


def test_through_the_driver_the_clients_round_is_fedavgs(tiny_tower):
    fed = make_federation(tiny_tower)
    sched = Schedule(rounds=2, batch_size=8, lr=0.1)
    adam = FederatedRun(method_from_name("fedadam"), tiny_tower, fed, schedule=sched, seed=0)
    avg = FederatedRun(method_from_name("promptfl"), tiny_tower, fed, schedule=sched, seed=0)
    x0 = adam.server["prompt"].clone()
    adam.run_round(0)
    avg.run_round(0)
    delta = avg.server["prompt"] - x0  # FedAvg's aggregate minus x: the pseudo-gradient
    scheme = adam.method.scheme
    m = (1 - scheme.beta1) * delta
    v = (1 - scheme.beta2) * delta.pow(2)
    want = x0 + scheme.server_lr * m / (v.sqrt() + scheme.tau)
    torch.testing.assert_close(adam.server["prompt"], want)
    torch.testing.assert_close(adam.server_state["m.prompt"], m)
    saved = adam.state_dict()
    adam.run_round(1)
    resumed = FederatedRun(method_from_name("fedadam"), tiny_tower, fed, schedule=sched, seed=0)
    resumed.load_state_dict(saved)
    resumed.run_round(1)
    assert torch.equal(resumed.server["prompt"], adam.server["prompt"])
    assert torch.equal(resumed.server_state["v.prompt"], adam.server_state["v.prompt"])
