"""The six presets of before the learner x scheme refactor give the same numbers after it.

`pinned_prerefactor.json` was written by the old driver (commit 92872ed, methods as one class
each) on the test federation of tests/test_driver.py: 2 rounds, batch 8, lr 0.1, seed 0, rank 2,
without DP and with DP (sigma 1, C 1). The old code noised DP-FPL's global prompt at the server
and every other method at the client, and kept clients' momentum on shared parameters across
rounds; the pin runs each preset under the trust model the old code used for it and with the
old momentum rule. FedPGP under DP is not pinned: its contrastive term is now a prior outside
per-sample clipping (it was clipped with the data before), which changes the DP update.
"""

import json
from pathlib import Path

import pytest
import torch

from fpl_bench.driver import FederatedRun, NoisePlan, Schedule
from fpl_bench.method import method_from_name
from fpl_bench.schemes._base import Scheme
from tests.test_driver import make_federation

PINNED = json.loads((Path(__file__).parent / "pinned_prerefactor.json").read_text())
CASES = [key for key in PINNED if key != "fedpgp/dp"]


@pytest.mark.parametrize("key", CASES)
def test_preset_reproduces_the_prerefactor_run(tiny_tower, monkeypatch, key):
    name, mode = key.split("/")
    monkeypatch.setattr(Scheme, "resets_shared_momentum", False)
    method = method_from_name(name, {"rank": 2} if name in ("dpfpl", "fedpgp") else {})
    run = FederatedRun(
        method,
        tiny_tower,
        make_federation(tiny_tower),
        schedule=Schedule(rounds=2, batch_size=8, lr=0.1),
        seed=0,
        trust="server" if name == "dpfpl" else "client",
    )
    if mode == "dp":
        run.enable_privacy(NoisePlan(noise_multiplier=1.0, clip_norm=1.0))
    history = run.run().history
    ref = PINNED[key]
    for got, want in zip(history, ref["history"], strict=True):
        for metric, value in want.items():
            assert got[metric] == pytest.approx(value, abs=1e-9), (metric, got, want)
    for c, sums in enumerate(ref["param_sums"]):
        view = run.view(c, evaluation=True)
        for param, value in sums.items():
            assert float(view[param].double().sum()) == pytest.approx(value, abs=1e-4), param
    assert torch.isfinite(torch.tensor(list(ref["param_sums"][0].values()) or [0.0])).all()
