"""ProDA against its paper, written out here: the Gaussian over class weights estimated from K
prompts' text features, its logits' covariance, the closed-form upper bound of the expected
cross-entropy (checked against a Monte Carlo estimate of that expectation, which it must bound),
the reference's diversity term; the K prompts through one tower forward; exact per-sample
gradients of all K prompts in float64 (one backward per sample), the diversity term apart as a
prior; which scheme shares them; runs through the driver (by name through the CLI: tests/test_new_presets_cli.py)."""

import pytest
import torch
import torch.nn.functional as F

from fpl_bench.learners._base import EncodeContext, InitContext
from fpl_bench.learners.proda import FREE, PROMPTS, class_free_features, diversity, proda_logits
from fpl_bench.method import method_from_name
from fpl_bench.privacy.per_sample import step_gradients
from tests.test_cocoop import tower64  # noqa: F401  (a float64 tiny tower, module fixture)
from tests.test_plot import assert_trains_every_prompt

F64 = torch.float64


def start(tower, name="proda", seed=0, **options):
    method = method_from_name(name, options)
    params, consts = method.init(InitContext(tower, torch.Generator().manual_seed(seed)))
    dtype = tower.positional.dtype
    return method, {k: v.to(dtype) for k, v in params.items()}, consts


def paper_surrogate(text, x, y, scale):
    """Sec. 3.2-3.3 written out: w_c ~ N(mu_c, Sigma) with mu from the K features and, per
    dimension d, the class-by-class covariance Sigma[d] = E_d E_d^T / (K + 1) (E_d [n, K] the
    centred features); logits z = s x . w have mean s x . mu and covariance
    A = s^2 sum_d x_d^2 Sigma[d]; the bound's logits are s x . mu_c + (A_cc + A_yy - 2 A_cy) / 2.
    text [K, n, D], x [D] normalised, y an int."""
    k = text.shape[0]
    mu = text.mean(0)  # [n, D]
    centred = (text - mu).permute(2, 1, 0)  # [D, n, K]
    sigma = centred @ centred.transpose(1, 2) / (k + 1)  # [D, n, n]
    a = scale**2 * torch.einsum("d,dij->ij", x * x, sigma)  # [n, n]
    diag = torch.diagonal(a)
    return scale * (mu @ x) + 0.5 * (diag + a[y, y] - 2 * a[:, y])


def monte_carlo_ce(text, x, y, scale, draws=200_000, seed=0):
    """E_w[-log softmax(s x . w)_y] under the same Gaussian, by sampling w."""
    k = text.shape[0]
    mu = text.mean(0)
    centred = text - mu  # [K, n, D]
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(draws, k, generator=gen, dtype=text.dtype)
    # w_{c,d} = mu_{c,d} + sum_k z_k e_{c,k,d} / sqrt(K + 1): per d, covariance E_d E_d^T / (K + 1)
    logits_mean = scale * (mu @ x)  # [n]
    logits_dev = scale * torch.einsum("bk,knd,d->bn", z, centred, x) / (k + 1) ** 0.5
    logits = logits_mean + logits_dev
    return F.cross_entropy(logits, torch.full((draws,), y), reduction="mean")


def spread_text(n_prompts=5, n_cls=4, dim=6, seed=0, spread=0.3):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n_cls, dim, generator=gen, dtype=F64)
    return F.normalize(
        base + spread * torch.randn(n_prompts, n_cls, dim, generator=gen, dtype=F64), dim=-1
    )


# -- the equations ---------------------------------------------------------------------------


@pytest.mark.parametrize("y", [0, 2, 3])
def test_surrogate_logits_are_the_papers_bound(tiny_tower, y):
    method, _, _ = start(tiny_tower)
    text = spread_text()
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(6, generator=gen, dtype=F64)
    ctx = EncodeContext(tiny_tower, torch.arange(4))
    scale = tiny_tower.logit_scale
    got = proda_logits(text, image, torch.tensor(y), scale)
    want = paper_surrogate(text, F.normalize(image, dim=0), y, scale)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the loss is the cross-entropy of those logits, one sample
    loss = method.learner.sample_loss({"classes": text}, image, None, torch.tensor(y), ctx)
    torch.testing.assert_close(loss, F.cross_entropy(want[None], torch.tensor([y])))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_surrogate_bounds_the_expected_cross_entropy_and_is_tight_without_spread(seed):
    scale = 10.0
    text = spread_text(seed=seed, spread=0.4)
    x = F.normalize(torch.randn(6, generator=torch.Generator().manual_seed(seed), dtype=F64), dim=0)
    for y in range(4):
        bound = F.cross_entropy(
            proda_logits(text, x, torch.tensor(y), scale)[None], torch.tensor([y])
        )
        expected = monte_carlo_ce(text, x, y, scale, seed=seed)
        mean_ce = F.cross_entropy(scale * (text.mean(0) @ x)[None], torch.tensor([y]))
        assert float(expected) <= float(bound) + 1e-3  # an upper bound (MC error ~1e-3)
        assert float(bound) > float(mean_ce)  # the variance term adds to the mean's loss
    # K identical prompts: no variance, the bound is the cross-entropy of the mean (CoOp's)
    same = text[:1].expand(5, -1, -1)
    got = proda_logits(same, x, torch.tensor(1), scale)
    torch.testing.assert_close(got, scale * (same[0] @ x))


def test_prediction_scores_the_mean_class_features(tiny_tower):
    method, params, consts = start(tiny_tower)
    ctx = EncodeContext(tiny_tower, torch.tensor([0, 2, 5]), consts)
    enc = method.encode(params, {}, ctx)
    images = torch.randn(3, tiny_tower.feature_dim, generator=torch.Generator().manual_seed(2))
    mean = enc["text"]["classes"].mean(0)
    want = tiny_tower.logit_scale * F.normalize(images, dim=-1) @ mean.T
    torch.testing.assert_close(method.logits(enc, images, None, ctx), want)
    assert torch.equal(method.predict(enc, images, None, ctx), want.argmax(-1))


def test_diversity_is_the_mean_absolute_off_diagonal_cosine():
    free = F.normalize(
        torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=F64), dim=-1
    )
    pairs = [abs(float(free[a] @ free[b])) for a in range(4) for b in range(4) if a != b]
    torch.testing.assert_close(diversity(free), torch.tensor(sum(pairs) / len(pairs), dtype=F64))
    assert float(diversity(free[:1])) == 0.0


# -- the learner -----------------------------------------------------------------------------


def test_the_schemes_prompt_is_prompt_0_and_the_learner_owns_k_minus_1(tiny_tower):
    _, params, _ = start(tiny_tower)
    n_ctx, width = tiny_tower.n_ctx, tiny_tower.width
    shapes = {k: tuple(v.shape) for k, v in params.items()}
    assert shapes == {"prompt": (n_ctx, width), PROMPTS: (3, n_ctx, width)}
    assert abs(float(params[PROMPTS].std()) - 0.02) < 0.006  # N(0, 0.02^2) draws
    _, eight, _ = start(tiny_tower, n_prompts=8)
    assert eight[PROMPTS].shape == (7, n_ctx, width)


def test_encode_gives_every_prompts_class_and_class_free_features(tiny_tower):
    method, params, consts = start(tiny_tower)
    classes = torch.tensor([0, 2, 5])
    ctx = EncodeContext(tiny_tower, classes, consts)
    text = method.encode(params, {}, ctx)["text"]
    assert text["classes"].shape == (4, 3, tiny_tower.feature_dim)
    every = torch.cat([params["prompt"][None], params[PROMPTS]])
    for k, prompt in enumerate(every):
        torch.testing.assert_close(text["classes"][k], tiny_tower.encode(prompt, classes))
    # a context that spells words gives the features of the written sentence "<words>."
    words = " ".join(["a"] * tiny_tower.n_ctx)
    spelled = tiny_tower.embed_phrase(words)
    phrased = {"prompt": spelled, PROMPTS: spelled.expand(3, -1, -1)}
    free = method.encode(phrased, {}, ctx)["text"]["free"]
    want = tiny_tower.encode_text([words + "."])[0]
    for row in free:
        torch.testing.assert_close(row, want, rtol=1e-4, atol=1e-5)
    # without a diversity weight there is no class-free forward and no prior
    lean, params0, consts0 = start(tiny_tower, lam=0.0)
    assert (
        "free" not in lean.encode(params0, {}, EncodeContext(tiny_tower, classes, consts0))["text"]
    )


def _reference_loss(tower, leaves, classes, image, label):
    every = torch.cat([leaves["prompt"][None], leaves[PROMPTS]])
    text = torch.stack([tower.encode(p, classes) for p in every])  # [K, n, D]
    x = F.normalize(image, dim=0)
    logits = paper_surrogate(text, x, int(label), tower.logit_scale)
    return F.cross_entropy(logits[None], label[None])


def test_per_sample_gradients_of_all_prompts_equal_a_backward_per_sample_in_float64(
    tower64,  # noqa: F811
):
    method, params, consts = start(tower64)
    params = {k: v + 0.05 * torch.randn_like(v) for k, v in params.items()}  # away from init
    classes = torch.arange(4)
    ctx = EncodeContext(tower64, classes, consts)
    gen = torch.Generator().manual_seed(6)
    images = torch.randn(3, tower64.feature_dim, generator=gen, dtype=F64)
    labels = torch.tensor([2, 0, 3])
    batch = (images, images.new_zeros(3, 0), labels)

    def encode(p):
        return method.encode(p, {}, ctx)

    def loss_one(z, x, t, y):
        return method.sample_loss(z, x, t, y, ctx)

    def prior(z, p):
        return method.prior(p, z, ctx, {})

    got = step_gradients(encode, loss_one, params, batch, per_sample=True, prior=prior)
    assert set(got.data) == {"prompt", PROMPTS}
    for i in range(3):  # the paper's loss, one sample, one ordinary backward
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        _reference_loss(tower64, leaves, classes, images[i], labels[i]).backward()
        for k, leaf in leaves.items():
            assert float(leaf.grad.abs().min(-1).values.sum()) > 0, k  # every prompt is read
            torch.testing.assert_close(got.data[k][i], leaf.grad, rtol=1e-8, atol=1e-12)
    # the diversity term: a prior, apart from the clipped rows, its gradient through the tower
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    every = torch.cat([leaves["prompt"][None], leaves[PROMPTS]])
    diversity(class_free_features(tower64, every, consts[FREE])).backward()
    for k, leaf in leaves.items():
        assert float(leaf.grad.abs().sum()) > 0
        torch.testing.assert_close(got.prior[k], leaf.grad, rtol=1e-8, atol=1e-12)


def test_fedavg_shares_all_k_prompts_local_keeps_them():
    assert method_from_name("fedproda").shared == ("prompt", PROMPTS)
    assert method_from_name("proda").shared == ()


@pytest.mark.parametrize("mode", ["none", "server", "client"])
def test_runs_through_the_driver_training_every_prompt(tiny_tower, mode):
    assert_trains_every_prompt(tiny_tower, mode, ("fedproda", "proda"), PROMPTS)
