"""The federated driver: seeded schedules, batches, SGD, and two-round smoke runs of every method."""

import math

import numpy as np
import pytest
import torch

from fpl_bench.catalog import list_presets
from fpl_bench.data.partition import Pathological
from fpl_bench.driver import (
    FeatureSet,
    FederatedRun,
    Federation,
    NoisePlan,
    Schedule,
    Upload,
    client_schedule,
    epoch_batches,
    poisson_batch,
    sgd_step,
)
from fpl_bench.evaluate import final_metrics
from fpl_bench.learners._base import EncodeContext
from fpl_bench.method import method_from_name
from fpl_bench.protocols import base2novel


def test_client_schedule_is_seeded_and_sized():
    a = client_schedule(10, rounds=5, fraction=0.3, seed=1)
    assert a == client_schedule(10, rounds=5, fraction=0.3, seed=1)
    assert a != client_schedule(10, rounds=5, fraction=0.3, seed=2)
    assert all(len(r) == 3 and len(set(r)) == 3 for r in a)


def test_epoch_batches_cover_every_example_once_per_epoch():
    batches = epoch_batches(10, batch_size=4, steps=3, seed_keys=(0, 1))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))


def test_poisson_batch_rate():
    sizes = [
        len(poisson_batch(1000, rate=0.1, gen=torch.Generator().manual_seed(i))) for i in range(50)
    ]
    assert abs(np.mean(sizes) - 100) < 5


def test_poisson_batch_from_the_secure_source_has_the_rate():
    sizes = [len(poisson_batch(1000, rate=0.1, gen=None)) for _ in range(200)]
    assert abs(np.mean(sizes) - 100) < 5 * (1000 * 0.1 * 0.9 / 200) ** 0.5


@pytest.mark.parametrize("secure", [False, True])
def test_secure_noise_draws_the_batches_from_the_secure_source_too(tiny_tower, secure):
    """With --secure-noise the Poisson batches are not the seed's: the seed is recorded with the
    run, and amplification by sampling holds only if nobody can tell which records a step
    used. Seeded, two runs of one seed sample the same batches."""
    fed = make_federation(tiny_tower)
    batches = []
    for _ in range(2):
        run = FederatedRun(
            method_from_name("coop"),
            tiny_tower,
            fed,
            schedule=Schedule(rounds=1, batch_size=4),
            seed=0,
        )
        run.enable_privacy(NoisePlan(noise_multiplier=1.0, clip_norm=1.0, secure=secure))
        batches.append([run._batch(0, 0, s, None) for s in range(20)])
    same = all(torch.equal(a, b) for a, b in zip(*batches, strict=True))
    assert same != secure


def test_sgd_step_matches_torch_optim_sgd():
    p = {"w": torch.tensor([1.0, -2.0])}
    buf: dict = {}
    ref = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    for g in (torch.tensor([0.5, 1.0]), torch.tensor([-1.0, 2.0])):
        sgd_step(p, {"w": g}, buf, lr=0.1, beta=0.9)
        ref.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p["w"], ref.detach())


def make_federation(tower, n_per_class=12, seed=0):
    """Image features = text features of each class under a hidden prompt, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    n_cls = tower.n_classes
    with torch.no_grad():
        hidden = tower.encode(
            0.5 * torch.randn(tower.n_ctx, tower.width, generator=gen)
        )  # [n_cls, D]

    def features(n):
        labels = torch.arange(n_cls).repeat_interleave(n)
        pooled = torch.nn.functional.normalize(
            hidden[labels] + 0.05 * torch.randn(len(labels), hidden.shape[1], generator=gen), dim=-1
        )
        tokens = torch.nn.functional.normalize(
            pooled[:, None, :] + 0.1 * torch.randn(len(labels), 4, hidden.shape[1], generator=gen),
            dim=-1,
        )
        return FeatureSet(pooled=pooled, tokens=tokens.half(), labels=labels)

    train, test = features(n_per_class), features(6)
    seen = torch.arange(4)
    split = Pathological(n_clients=2, seed=seed).split(
        train.labels.numpy(), test.labels.numpy(), seen.numpy()
    )
    protocol = base2novel(seen.numpy(), np.array([4, 5]), test_labels=test.labels.numpy())
    return Federation(train=train, test=test, split=split, protocol=protocol)


def image_federation(vision, n_classes=6, n_per_class=6):
    """Pixels coloured per class (so a prompt can learn), as cached image-tower tokens."""
    gen = torch.Generator().manual_seed(0)
    colours = torch.rand(n_classes, 3, 1, 1, generator=gen)

    def features(n):
        labels = torch.arange(n_classes).repeat_interleave(n)
        pixels = colours[labels] + 0.3 * torch.randn(len(labels), 3, 32, 32, generator=gen)
        tokens = vision.embed(pixels)
        with torch.no_grad():  # frozen CLIP's image features, as the feature cache holds them
            pooled = torch.nn.functional.normalize(vision.visual(pixels), dim=-1)
        return FeatureSet(pooled=pooled, tokens=None, labels=labels, embedded=tokens)

    train, test = features(n_per_class), features(3)
    seen = torch.arange(4)
    split = Pathological(n_clients=2, seed=0).split(
        train.labels.numpy(), test.labels.numpy(), seen.numpy()
    )
    protocol = base2novel(
        seen.numpy(), torch.tensor([4, 5]).numpy(), test_labels=test.labels.numpy()
    )
    return Federation(train=train, test=test, split=split, protocol=protocol)


def federation_for(method, tiny_tower, tiny_vision, **kw):
    """(federation, vision tower or None): cached image-tower tokens for a learner that prompts
    the image tower, the text-feature federation otherwise."""
    if not method.prompts_image_tower:
        return make_federation(tiny_tower, **kw), None
    return image_federation(tiny_vision), tiny_vision


@pytest.mark.parametrize("name", list_presets())
@pytest.mark.parametrize("private", [False, True])
def test_two_round_smoke_run(tiny_tower, tiny_vision, name, private):
    method = method_from_name(name, {"rank": 2} if name in ("dpfpl", "fedpgp") else {})
    fed, vision = federation_for(method, tiny_tower, tiny_vision)
    run = FederatedRun(
        method,
        tiny_tower,
        fed,
        schedule=Schedule(rounds=2, batch_size=8, lr=0.1),
        seed=0,
        vision=vision,
    )
    before = {c: {k: v.clone() for k, v in s.params.items()} for c, s in enumerate(run.clients)}
    if private:
        run.enable_privacy(NoisePlan(noise_multiplier=1.0, clip_norm=1.0))
    out = run.run()
    last = out.history[-1]
    assert set(last) >= {"local_acc", "neighbor_acc", "base_acc", "novel_acc", "hm"}
    assert all(0.0 <= last[k] <= 1.0 for k in ("local_acc", "base_acc", "novel_acc"))
    if method.trains:
        assert len(out.history) == 2
        assert private == ("train_loss" not in out.history[-1])  # no private loss is released
        if not private:
            assert math.isfinite(out.history[-1]["train_loss"])
        changed = any(
            not torch.equal(before[0][k], run.view(0, evaluation=True)[k]) for k in before[0]
        )
        assert changed
        # Only the shared parameters are common to the clients' evaluation views.
        views = [run.view(c, evaluation=True) for c in range(2)]
        for key in views[0]:
            same = torch.equal(views[0][key], views[1][key])
            assert same == (key in method.shared or method.scheme.pools_clients), key


def _grouped_presets() -> list[str]:
    """The presets that train clients in groups (not zero-shot: nothing to train; not central:
    one pooled trainer)."""
    methods = {name: method_from_name(name) for name in list_presets()}
    return [n for n, m in methods.items() if m.trains and not m.scheme.pools_clients]


@pytest.mark.parametrize("name", _grouped_presets())
def test_a_private_step_of_clients_one_of_them_without_samples(tiny_tower, tiny_vision, name):
    """A Poisson batch may be empty (likely at a small batch size). In a step of several
    clients at once, the client with no samples adds zero rows and no loss, and the other
    client's per-sample gradients are those of its own step; no learner's per-sample loss is
    called on no samples (a loss that picks its label's logit cannot be)."""
    method = method_from_name(name, {"rank": 2} if name in ("dpfpl", "fedpgp") else {})
    fed, vision = federation_for(method, tiny_tower, tiny_vision)
    schedule = Schedule(rounds=1, batch_size=4, lr=0.1)
    run = FederatedRun(method, tiny_tower, fed, schedule=schedule, seed=0, vision=vision)
    run.enable_privacy(NoisePlan(noise_multiplier=1.0, clip_norm=1.0))
    drawn, empty = run.train_idx[0][:3], run.train_idx[1][:0]
    (_, got), (_, none) = run.steps_computer.batched([0, 1], 0, 0, [drawn, empty])
    _, want = run.steps_computer.one(0, 0, 0, drawn)
    assert set(got.data) == set(want.data) and got.data
    for key, rows in want.data.items():
        assert rows.shape[0] == 3
        scale = float(rows.abs().max())  # float32: a batched matmul rounds unlike a single one
        torch.testing.assert_close(got.data[key][:3], rows, rtol=1e-4, atol=1e-4 * scale)
        assert not none.data[key].any(), key
    assert not none.losses.any() and got.losses[:3].ne(0).all()


def test_coop_training_lowers_the_loss_and_beats_chance(tiny_tower):
    fed = make_federation(tiny_tower)
    schedule = Schedule(rounds=10, batch_size=8, lr=0.5)
    trained = FederatedRun(
        method_from_name("coop"), tiny_tower, fed, schedule=schedule, seed=0
    ).run()
    losses = [h["train_loss"] for h in trained.history]
    assert losses[-1] < losses[0] - 0.01
    assert trained.history[-1]["local_acc"] > 0.6  # 2 classes per client: chance 0.5


def test_a_run_evaluates_only_the_rounds_its_result_averages(tiny_tower, monkeypatch):
    fed = make_federation(tiny_tower)
    scored, histories = [], []
    real = FederatedRun.evaluate

    def counting(self, rnd):
        scored[-1].append(rnd + 1)
        return real(self, rnd)

    monkeypatch.setattr(FederatedRun, "evaluate", counting)
    for last in (None, 2):  # the learning curve; only the evaluations the result reads
        scored.append([])
        schedule = Schedule(rounds=5, batch_size=8, lr=0.1, eval_every=2, eval_last=last)
        run = FederatedRun(method_from_name("coop"), tiny_tower, fed, schedule=schedule, seed=1)
        histories.append(run.run().history)
    assert scored == [[2, 4, 5], [4, 5]]
    assert histories[1] == histories[0][-2:]  # the same numbers, so the same final figure
    assert final_metrics(histories[1], 2) == final_metrics(histories[0], 2)


def test_same_seed_same_run(tiny_tower):
    fed = make_federation(tiny_tower)
    schedule = Schedule(rounds=2, batch_size=8, lr=0.1)
    runs = []
    for _ in range(2):
        run = FederatedRun(method_from_name("promptfl"), tiny_tower, fed, schedule=schedule, seed=3)
        run.enable_privacy(NoisePlan(noise_multiplier=0.5, clip_norm=1.0))
        run.run()
        runs.append(run.server["prompt"])
    torch.testing.assert_close(runs[0], runs[1])


def test_client_noise_std_matches_formula(tiny_tower):
    """With an empty Poisson batch the client's step gradient is pure noise: std = sigma C / E[B]."""
    fed = make_federation(tiny_tower)
    run = FederatedRun(
        method_from_name("coop"), tiny_tower, fed, schedule=Schedule(rounds=1, batch_size=8), seed=0
    )
    run.enable_privacy(NoisePlan(noise_multiplier=2.0, clip_norm=0.5))
    draws = [
        run.local_gradients(0, 0, s, torch.empty(0, dtype=torch.long))[1]["prompt"]
        for s in range(20)
    ]
    expected_batch = 8  # q * n with q = B / n
    std = torch.stack(draws).std().item()
    assert abs(std - 2.0 * 0.5 / expected_batch) < 0.05 * (2.0 * 0.5 / expected_batch)


def test_server_noise_is_added_once_to_the_sum_over_clients(tiny_tower):
    """DP-FPL's global prompt: the server's step is (sum of clipped sums + N(0, (sigma C)^2)) / sum E[B]."""
    fed = make_federation(tiny_tower)
    run = FederatedRun(
        method_from_name("dpfpl", {"rank": 2}),
        tiny_tower,
        fed,
        schedule=Schedule(rounds=1, batch_size=8, lr=1.0, momentum=0.0),
        seed=0,
    )
    run.enable_privacy(NoisePlan(noise_multiplier=3.0, clip_norm=1.0))
    steps = []
    for s in range(10):
        before = run.server["p_global"].clone()
        zero = {"p_global": torch.zeros_like(before)}
        run.sync.end_step([Upload(zero, 8.0), Upload(zero, 8.0)], 0, s, [0, 1])
        steps.append(before - run.server["p_global"])  # lr 1, no momentum: the applied gradient
    std = torch.stack(steps).std().item()
    expected = 3.0 * 1.0 / (8 + 8)
    assert abs(std - expected) < 0.05 * expected


def test_clients_keep_separate_optimizer_state(tiny_tower):
    """Unlike the DP-FPL reference, which shares one optimizer and momentum buffer."""
    fed = make_federation(tiny_tower)
    run = FederatedRun(
        method_from_name("coop"),
        tiny_tower,
        fed,
        schedule=Schedule(rounds=1, batch_size=8, lr=0.1),
        seed=0,
    )
    run.run_round(0)
    buffers = [run.clients[c].momentum["prompt"] for c in range(2)]
    assert (
        not torch.equal(buffers[0], buffers[1]) and buffers[0].data_ptr() != buffers[1].data_ptr()
    )
    assert run.steps == [3, 3]  # 2 classes x 12 examples, batch 8


@pytest.mark.parametrize("trust", ["server", "client"])
def test_promptfl_noise_sits_where_the_trust_model_says(tiny_tower, trust):
    """Server trust: the client's shared upload is an un-noised clipped sum and the server adds
    N(0, (sigma C)^2) once to the sum over clients; client trust: the client noises it."""
    fed = make_federation(tiny_tower)
    run = FederatedRun(
        method_from_name("promptfl"),
        tiny_tower,
        fed,
        schedule=Schedule(rounds=1, batch_size=8, lr=1.0, momentum=0.0),
        seed=0,
        trust=trust,
    )
    run.enable_privacy(NoisePlan(noise_multiplier=3.0, clip_norm=1.0))
    assert run.placement.sync == ("step" if trust == "server" else "round")
    empty = torch.empty(0, dtype=torch.long)
    client_side, server_side = [], []
    for s in range(12):
        _, local, upload, _ = run.local_gradients(0, 0, s, empty)
        if trust == "server":
            assert not local and torch.count_nonzero(upload.grads["prompt"]) == 0
            before = run.server["prompt"].clone()
            run.sync.end_step([upload, upload], 0, s, [0, 1])
            server_side.append(before - run.server["prompt"])
        else:
            assert upload is None
            client_side.append(local["prompt"])
    if trust == "server":
        expected = 3.0 * 1.0 / (8 + 8)  # sigma C over the expected total batch
        assert abs(torch.stack(server_side).std().item() - expected) < 0.05 * expected
    else:
        expected = 3.0 * 1.0 / 8  # sigma C over the client's expected batch
        assert abs(torch.stack(client_side).std().item() - expected) < 0.05 * expected


def test_non_finite_parameters_stop_the_run_as_diverged(tiny_tower):
    from fpl_bench.driver import Diverged

    run = FederatedRun(
        method_from_name("coop"),
        tiny_tower,
        make_federation(tiny_tower),
        schedule=Schedule(rounds=3, batch_size=8, lr=float("inf")),
        seed=0,
    )
    with pytest.raises(Diverged) as err:
        run.run()
    assert err.value.round_no == 1


def test_no_training_loss_is_recorded_under_dp(tiny_tower):
    run = FederatedRun(
        method_from_name("coop"),
        tiny_tower,
        make_federation(tiny_tower),
        schedule=Schedule(rounds=1, batch_size=8, lr=0.1),
        seed=0,
    )
    run.enable_privacy(NoisePlan(noise_multiplier=1.0, clip_norm=1.0))
    assert all("train_loss" not in h for h in run.run().history)


# fedbpl: one global model; its draws at evaluation are the round's, not the client's
@pytest.mark.parametrize(
    ("name", "distinct_views"), [("promptfl", 1), ("coop", 2), ("fedbpl", 1), ("bpl", 2)]
)
def test_clients_with_the_same_values_are_scored_once(
    tiny_tower, monkeypatch, name, distinct_views
):
    fed = make_federation(tiny_tower)
    run = FederatedRun(
        method_from_name(name), tiny_tower, fed, schedule=Schedule(rounds=1, lr=0.1), seed=0
    )
    run.run_round(0)
    calls = []
    real = FederatedRun._correct

    def counting(self, *args):
        calls.append(1)
        return real(self, *args)

    monkeypatch.setattr(FederatedRun, "_correct", counting)
    _, per_client = run.evaluate(0)
    n_sets = len(fed.protocol.eval_sets)
    assert len(calls) == n_sets * distinct_views
    # the same numbers as scoring each client on its own
    for c, metrics in enumerate(per_client):
        step, aux = run.eval_params(c, 0)
        correct = {}
        for es in fed.protocol.eval_sets:
            classes = torch.as_tensor(es.classes)
            pooled, tokens, labels = fed.test.take(torch.as_tensor(es.images))
            ctx = EncodeContext(tower=tiny_tower, class_idx=classes, consts=run.consts)
            encoded = run.method.encode(step, aux, ctx)
            targets = torch.searchsorted(classes, labels)
            correct[es.name] = real(run, encoded, pooled, tokens, targets, ctx)
        alone = fed.protocol.client_metrics(
            correct,
            local_test=np.asarray(fed.split.test[c]),
            client_classes=np.asarray(fed.split.classes[c]),
        )
        assert metrics == alone
