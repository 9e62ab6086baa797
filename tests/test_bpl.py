"""BPL against its paper, written out here: the two meta-nets of the amortised posterior, the
reparameterised residuals, the loss -log (1/L) sum_l p(y | x, r_l) + beta KL and the averaged
prediction; the seeded draws (a counter-based hash: reproducible, standard normal, bound to the
record and not to its place in the batch); exact per-sample gradients of the context and both
meta-nets, KL included, in float64 (one backward per sample); which scheme shares them; runs
through the driver (reproducibly; by name through the CLI: tests/test_new_presets_cli.py)."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from fpl_bench.catalog import default_presets, resolve_method
from fpl_bench.driver import FederatedRun, NoisePlan, Schedule
from fpl_bench.errors import UsageError
from fpl_bench.learners._base import EncodeContext, InitContext
from fpl_bench.learners.bpl import KEY, META, mix32, record_seed, standard_normal
from fpl_bench.method import method_from_name
from fpl_bench.privacy.per_sample import step_gradients
from fpl_bench.spec import build_spec
from tests.test_cocoop import tower64  # noqa: F401  (a float64 tiny tower, module fixture)
from tests.test_driver import make_federation

F64 = torch.float64


def start(tower, name="bpl", seed=0, **options):
    method = method_from_name(name, options)
    params, consts = method.init(InitContext(tower, torch.Generator().manual_seed(seed)))
    dtype = tower.positional.dtype
    return method, {k: v.to(dtype) for k, v in params.items()}, consts


def meta_net(own, head, x):
    """Linear -> ELU -> Linear -> ELU -> Linear, as the reference's InferenceBlock."""
    p = {part: own[f"bpl.{head}.{part}"] for part in ("w1", "b1", "w2", "b2", "w3", "b3")}
    h = torch.nn.functional.elu(p["w1"] @ x + p["b1"])
    h = torch.nn.functional.elu(p["w2"] @ h + p["b2"])
    return p["w3"] @ h + p["b3"]


def paper_terms(tower, ctx_vectors, own, key, image, class_idx, samples):
    """One image: r_l = mu + sigma eps_l on the normalised feature, prompts v + r_l for every
    class, log p_l = log softmax(s cos); returns (log p [L, n], mu, log sigma^2)."""
    x = image / image.norm()
    mu, logvar = meta_net(own, "mean", x), meta_net(own, "logvar", x)
    eps = standard_normal(record_seed(key, image), (samples, mu.shape[0]), mu.dtype)
    rows = []
    for l in range(samples):  # noqa: E741
        r = mu + torch.exp(0.5 * logvar) * eps[l]
        text = tower.encode(ctx_vectors + r, class_idx)  # [n, D]
        rows.append(torch.log_softmax(tower.logit_scale * (text @ x), dim=-1))
    return torch.stack(rows), mu, logvar


def paper_loss(tower, ctx_vectors, own, key, image, label, class_idx, samples, beta):
    log_p, mu, logvar = paper_terms(tower, ctx_vectors, own, key, image, class_idx, samples)
    likelihood = log_p[:, label].exp().mean()  # (1/L) sum_l p(y | x, r_l)
    kl = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).mean()
    return -torch.log(likelihood) + beta * kl


# -- the seeded draws ------------------------------------------------------------------------


def test_mix32_is_lowbias32_on_python_integers():
    def ref(h):
        h ^= h >> 16
        h = (h * 0x7FEB352D) & 0xFFFFFFFF
        h ^= h >> 15
        h = (h * 0x846CA68B) & 0xFFFFFFFF
        return h ^ (h >> 16)

    values = [0, 1, 2, 0xFFFF, 0x10000, 12345, 0x80000000, 0xFFFFFFFF, 987654321]
    assert mix32(torch.tensor(values)).tolist() == [ref(v) for v in values]


def test_draws_are_standard_normal_and_uncorrelated():
    seeds = torch.arange(4000, dtype=torch.int64) * 7919
    eps = standard_normal(mix32(seeds), (4, 64), F64)  # [4000, 4, 64]
    flat = eps.flatten()
    assert abs(float(flat.mean())) < 0.01 and abs(float(flat.std()) - 1.0) < 0.01
    assert abs(float((flat**4).mean()) - 3.0) < 0.05  # Gaussian kurtosis
    within = torch.corrcoef(eps.reshape(4000, -1)[:, :8].T)  # counters of one record
    assert float((within - torch.eye(8, dtype=F64)).abs().max()) < 0.06
    # neighbouring seeds: record 2j against record 2j + 1, counter by counter
    pair = torch.corrcoef(torch.stack([eps[0::2].flatten(), eps[1::2].flatten()]))
    assert abs(float(pair[0, 1])) < 0.01
    # a normal quantile check: P(eps < 1) = 0.8413
    assert abs(float((flat < 1.0).double().mean()) - 0.8413) < 0.005


def test_a_records_draws_depend_on_the_key_and_its_image_not_on_its_batch():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(6, 16, generator=gen)
    key = torch.tensor([3.0, 1.0, 4.0])
    seeds = record_seed(key, images)
    assert len(set(seeds.tolist())) == 6
    alone = torch.stack([record_seed(key, images[i]) for i in range(6)])
    assert torch.equal(seeds, alone)
    assert torch.equal(torch.func.vmap(lambda x: record_seed(key, x))(images), seeds)
    assert torch.equal(record_seed(key, images.double()), seeds)  # float32 bits either way
    other = record_seed(torch.tensor([3.0, 1.0, 5.0]), images)
    assert not (other == seeds).any()


def test_the_step_key_comes_from_the_steps_stream(tiny_tower):
    method, params, _ = start(tiny_tower)
    _, aux = method.step_params(params, torch.Generator().manual_seed(11))
    _, again = method.step_params(params, torch.Generator().manual_seed(11))
    _, other = method.step_params(params, torch.Generator().manual_seed(12))
    assert set(aux) == {KEY} and aux[KEY].dtype == torch.float32
    assert torch.equal(aux[KEY], again[KEY]) and not torch.equal(aux[KEY], other[KEY])
    assert (aux[KEY] == aux[KEY].round()).all() and (aux[KEY] < 2**21).all()


# -- the equations ---------------------------------------------------------------------------


def test_meta_nets_are_two_three_layer_mlps_with_torch_init(tiny_tower):
    _, params, _ = start(tiny_tower)
    dim, width, hidden = tiny_tower.feature_dim, tiny_tower.width, tiny_tower.feature_dim // 2
    for head in ("mean", "logvar"):
        shapes = {p: tuple(params[f"bpl.{head}.{p}"].shape) for p in ("w1", "w2", "w3", "b3")}
        assert shapes == {
            "w1": (hidden, dim),
            "w2": (hidden, hidden),
            "w3": (width, hidden),
            "b3": (width,),
        }
        for p, fan_in in (("w1", dim), ("w2", hidden), ("w3", hidden)):
            assert params[f"bpl.{head}.{p}"].abs().max() <= 1 / fan_in**0.5
    assert not torch.equal(params["bpl.mean.w1"], params["bpl.logvar.w1"])


def test_loss_and_prediction_are_the_papers(tower64):  # noqa: F811
    method, params, consts = start(tower64, samples=3)
    params = {k: v + 0.05 * torch.randn_like(v) for k, v in params.items()}
    classes = torch.tensor([0, 2, 3])
    ctx = EncodeContext(tower64, classes, consts)
    step, aux = method.step_params(params, torch.Generator().manual_seed(1))
    enc = method.encode(step, aux, ctx)
    images = torch.randn(
        4, tower64.feature_dim, generator=torch.Generator().manual_seed(2), dtype=F64
    )
    labels = torch.tensor([1, 0, 2, 2])
    want_logits = []
    for i in range(4):
        got = method.sample_loss(enc, images[i], images.new_zeros(0), labels[i], ctx)
        want = paper_loss(
            tower64, params["prompt"], params, aux[KEY], images[i], int(labels[i]), classes, 3, 1e-3
        )
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        log_p, _, _ = paper_terms(
            tower64, params["prompt"], params, aux[KEY], images[i], classes, 3
        )
        want_logits.append(torch.log(log_p.exp().mean(0)))  # log (1/L) sum_l p_l
    want_logits = torch.stack(want_logits)
    torch.testing.assert_close(method.logits(enc, images, None, ctx), want_logits)
    torch.testing.assert_close(method.logits(enc, images[1], None, ctx), want_logits[1])
    assert torch.equal(method.predict(enc, images, None, ctx), want_logits.argmax(-1))


def test_kl_is_the_closed_form_and_zero_at_the_prior():
    from fpl_bench.learners.bpl import gaussian_kl

    mu = torch.randn(7, dtype=F64)
    logvar = torch.randn(7, dtype=F64)
    want = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).mean()
    torch.testing.assert_close(gaussian_kl(mu, logvar), want)
    assert float(gaussian_kl(torch.zeros(5), torch.zeros(5))) == 0.0


def test_without_encoding_the_steps_draws_the_loss_refuses(tiny_tower):
    method, params, consts = start(tiny_tower)
    ctx = EncodeContext(tiny_tower, torch.arange(3), consts)
    enc = method.encode(params, {}, ctx)
    with pytest.raises(ValueError, match="step's draws"):
        method.logits(enc, torch.randn(2, tiny_tower.feature_dim), None, ctx)


def test_per_sample_gradients_equal_a_backward_per_sample_in_float64(tower64):  # noqa: F811
    method, params, consts = start(tower64, samples=2, kl_weight=0.5)
    params = {k: v + 0.05 * torch.randn_like(v) for k, v in params.items()}
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(4, tower64.feature_dim, generator=gen, dtype=F64)
    labels = torch.tensor([0, 3, 1, 1])
    classes = torch.arange(4)
    ctx = EncodeContext(tower64, classes, consts)
    step, aux = method.step_params(params, gen)

    def encode(p):
        return method.encode(p, aux, ctx)

    def loss_one(z, x, t, y):
        return method.sample_loss(z, x, t, y, ctx)

    batch = (images, images.new_zeros(4, 0), labels)
    got = step_gradients(encode, loss_one, step, batch, per_sample=True)
    assert set(got.data) == {"prompt", *META}
    for i in range(4):  # the paper's loss (KL included), one sample, one ordinary backward
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        loss = paper_loss(
            tower64, leaves["prompt"], leaves, aux[KEY], images[i], int(labels[i]), classes, 2, 0.5
        )
        loss.backward()
        for k, leaf in leaves.items():
            assert float(leaf.grad.abs().sum()) > 0, k  # the KL reaches the log-variance net
            torch.testing.assert_close(got.data[k][i], leaf.grad, rtol=1e-8, atol=1e-12)
    # a sample's gradient is the same in a batch of one: it reads no other sample
    alone = step_gradients(encode, loss_one, step, tuple(t[2:3] for t in batch), per_sample=True)
    for k in got.data:
        torch.testing.assert_close(alone.data[k][0], got.data[k][2], rtol=1e-9, atol=1e-13)


# -- the federation --------------------------------------------------------------------------


def test_fedavg_shares_the_meta_nets_local_keeps_them_and_bpl_is_not_a_default():
    assert method_from_name("fedbpl").shared == ("prompt", *META)
    assert method_from_name("bpl").shared == ()
    assert "bpl" not in default_presets() and "fedbpl" not in default_presets()


def test_a_scheme_whose_prior_needs_extra_prompt_features_is_refused():
    with pytest.raises(UsageError, match="builds per image"):
        build_spec(methods=(resolve_method("bpl@sigma_uv"),))


def _run(tower, name, mode, seed=0):
    trust = mode.replace("none", "server")
    run = FederatedRun(
        method_from_name(name, {"learner.samples": 2}),
        tower,
        make_federation(tower, n_per_class=6),
        schedule=Schedule(rounds=2, batch_size=4, lr=0.1),
        seed=seed,
        trust=trust,
    )
    if mode != "none":
        run.enable_privacy(NoisePlan(noise_multiplier=1.0, clip_norm=1.0))
    return run


@pytest.mark.parametrize("mode", ["none", "server", "client"])
def test_runs_through_the_driver_reproducibly(tiny_tower, mode):
    for name, shared in (("fedbpl", True), ("bpl", False)):
        run = _run(tiny_tower, name, mode)
        before = run.view(0, evaluation=True)
        out = run.run()
        last = out.history[-1]
        assert all(0.0 <= last[k] <= 1.0 for k in ("local_acc", "base_acc", "novel_acc"))
        views = [run.view(c, evaluation=True) for c in range(2)]
        for k in ("prompt", "bpl.mean.w3", "bpl.logvar.b3"):
            assert not torch.equal(before[k], views[0][k]), (name, k)
            assert torch.equal(views[0][k], views[1][k]) == shared, (name, k)
        if name == "fedbpl":  # the same seed gives the same run, draws included
            again = _run(tiny_tower, name, mode)
            assert again.run().history[-1] == last
            for k, v in again.view(0, evaluation=True).items():
                assert torch.equal(v, views[0][k]), k
            other = _run(tiny_tower, name, mode, seed=1)
            other.run()
            assert not torch.equal(other.view(0, evaluation=True)["prompt"], views[0]["prompt"])
