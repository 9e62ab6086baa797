"""Every valid learner x scheme pair runs one short round through the driver, without and with
DP under both trust models: per-sample gradient norms are clipped to C inside the driver, and
only a scheme's shared parameters ever reach the server."""

import math

import pytest
import torch

import fpl_bench.driver as driver_module
from fpl_bench.catalog import resolve_method
from fpl_bench.driver import FederatedRun, NoisePlan, Schedule
from fpl_bench.method import all_pairs, build_method
from fpl_bench.privacy.mechanism import per_sample_norms
from fpl_bench.schemes._base import Scheme
from tests.privacy.test_mechanism import clipped_rows
from tests.test_driver import federation_for

VALID = [f"{learner}@{scheme}" for learner, scheme, problem in all_pairs() if problem is None]
CLIP = 0.05


def test_the_pairs_include_the_new_entries():
    assert {"kgcoop@fedavg", "coop@fedprox", "ot@global_local", "kgcoop@dpfpl"} <= set(VALID)


@pytest.mark.parametrize("pair", VALID)
@pytest.mark.parametrize("mode", ["none", "server"])
def test_pair_runs_a_round_clipped_and_sharing_only_its_shared_parameters(
    tiny_tower, tiny_vision, monkeypatch, pair, mode
):
    assert_pair_runs_clipped_and_sharing_only_shared(
        tiny_tower, tiny_vision, monkeypatch, pair, mode
    )


def assert_pair_runs_clipped_and_sharing_only_shared(
    tiny_tower, tiny_vision, monkeypatch, pair, mode
):
    options = {"scheme.rank": 2} if pair.split("@")[1] in ("dpfpl", "sigma_uv") else {}
    method = build_method(resolve_method(pair, options))
    shared = set(method.shared)
    norms: list[torch.Tensor] = []
    reached_server: list[set[str]] = []

    real_clipped_sum = driver_module.clipped_sum

    def recording_clipped_sum(grads, *, clip_norm):
        if len(next(iter(grads.values()))):
            norms.append(per_sample_norms(clipped_rows(grads, clip_norm=clip_norm)))
        return real_clipped_sum(grads, clip_norm=clip_norm)

    real_aggregate = Scheme.aggregate

    def recording_aggregate(self, uploads):
        for tensors, _ in uploads:
            reached_server.append(set(tensors))
        return real_aggregate(self, uploads)

    real_local = FederatedRun.local_gradients

    def recording_local(self, *args):
        step, local, upload, loss = real_local(self, *args)
        if upload is not None:
            reached_server.append(set(upload.grads) | set(upload.prior or {}))
        return step, local, upload, loss

    monkeypatch.setattr(driver_module, "clipped_sum", recording_clipped_sum)
    monkeypatch.setattr(type(method.scheme), "aggregate", recording_aggregate)
    monkeypatch.setattr(FederatedRun, "local_gradients", recording_local)

    fed, vision = federation_for(method, tiny_tower, tiny_vision, n_per_class=6)
    run = FederatedRun(
        method,
        tiny_tower,
        fed,
        schedule=Schedule(rounds=1, batch_size=4, lr=0.05),
        seed=0,
        trust="client" if mode == "client" else "server",
        vision=vision,
    )
    if mode != "none":
        run.enable_privacy(NoisePlan(noise_multiplier=0.5, clip_norm=CLIP))
    out = run.run()
    last = out.history[-1]
    assert all(0.0 <= last[k] <= 1.0 for k in ("local_acc", "base_acc", "novel_acc"))
    if mode == "none":
        assert not norms
        if method.trains:
            assert math.isfinite(last["train_loss"])
    else:
        assert "train_loss" not in last  # not released under DP
        assert bool(norms) == method.trains  # nothing to clip for zero-shot
        assert all(float(n.max()) <= CLIP * (1 + 1e-5) for n in norms)
    assert all(keys <= shared for keys in reached_server), (reached_server, shared)
    if shared:
        assert reached_server


def test_client_trust_runs_step_synced_and_round_synced_schemes(
    tiny_tower, tiny_vision, monkeypatch
):
    for pair in ("coop@dpfpl", "kgcoop@fedprox"):
        assert_pair_runs_clipped_and_sharing_only_shared(
            tiny_tower, tiny_vision, monkeypatch, pair, "client"
        )
