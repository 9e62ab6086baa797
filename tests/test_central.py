"""The central scheme trains one prompt on the pooled data of every client: exactly the run of
one client that holds the union of their training examples, with and without DP, and every
client is evaluated with that prompt."""

import numpy as np
import pytest
import torch

from fpl_bench.data.partition import ClientSplit
from fpl_bench.driver import FederatedRun, Federation, NoisePlan, Schedule, training_groups
from fpl_bench.method import method_from_name
from tests.test_driver import make_federation


def test_training_groups():
    assert training_groups(3, pooled=False) == [[0], [1], [2]]
    assert training_groups(3, pooled=True) == [[0, 1, 2]]


def one_client_holding_everything(fed: Federation) -> Federation:
    split = fed.split
    union = np.concatenate(split.train)
    pooled = ClientSplit(
        train=(union,),
        test=(np.concatenate(split.test),),
        classes=(np.unique(np.concatenate(split.classes)),),
    )
    return Federation(train=fed.train, test=fed.test, split=pooled, protocol=fed.protocol)


@pytest.mark.parametrize("private", [False, True])
def test_central_is_one_client_on_the_union(tiny_tower, private):
    fed = make_federation(tiny_tower)
    sched = Schedule(rounds=2, batch_size=8, lr=0.1)
    central = FederatedRun(method_from_name("central"), tiny_tower, fed, schedule=sched, seed=0)
    alone = FederatedRun(
        method_from_name("coop"),
        tiny_tower,
        one_client_holding_everything(fed),
        schedule=sched,
        seed=0,
    )
    n_total = sum(len(t) for t in fed.split.train)
    assert len(central.clients) == 1 and central.n_train == [n_total]
    if private:
        for run in (central, alone):
            run.enable_privacy(NoisePlan(noise_multiplier=1.0, clip_norm=1.0))
        assert central.budget() == alone.budget()
        assert central.budget()[0][0] == pytest.approx(8 / n_total)  # rate B / (sum_i n_i)
    central.run()
    alone.run()
    assert torch.equal(central.clients[0].params["prompt"], alone.clients[0].params["prompt"])
    # every client of the split is evaluated, each with the pooled prompt
    _, per_client = central.evaluate(1)
    assert len(per_client) == fed.split.n_clients == 2
    for c in range(2):
        assert torch.equal(
            central.view(c, evaluation=True)["prompt"], central.clients[0].params["prompt"]
        )
