"""Data-independent priors: KgCoOp's and FedProx's terms against hand values, and their
gradients outside per-sample clipping equal plain autograd of mean loss + prior."""

import pytest
import torch

from fpl_bench.learners._base import EncodeContext, InitContext
from fpl_bench.method import method_from_name
from fpl_bench.privacy.per_sample import step_gradients


def _setup(tower, name, **options):
    method = method_from_name(name, options)
    params, consts = method.init(
        InitContext(tower=tower, generator=torch.Generator().manual_seed(0))
    )
    ctx = EncodeContext(tower=tower, class_idx=torch.tensor([0, 1, 2, 3]), consts=consts)
    return method, params, ctx


def test_kgcoop_prior_is_lambda_times_mean_squared_distance(tiny_tower):
    method, params, ctx = _setup(tiny_tower, "kgcoop", lam=3.0)
    z = method.encode(params, {}, ctx)
    w_clip = tiny_tower.encode_text([f"a photo of a {n}." for n in tiny_tower.classnames])[:4]
    expected = 3.0 * ((z["text"][0] - w_clip) ** 2).sum(-1).mean()
    torch.testing.assert_close(method.prior(params, z, ctx, {}), expected)
    # unit vectors: ||w - w_clip||^2 = 2 - 2 cos
    cos = (z["text"][0] * w_clip).sum(-1)
    torch.testing.assert_close(expected, 3.0 * (2 - 2 * cos).mean())


def test_fedprox_prior_is_half_mu_squared_distance_to_the_anchor(tiny_tower):
    method, params, ctx = _setup(tiny_tower, "fedprox", mu=0.5)
    anchor = {"prompt": params["prompt"] + 0.1}
    z = method.encode(params, {}, ctx)
    expected = 0.25 * (0.1**2) * params["prompt"].numel()
    torch.testing.assert_close(
        method.prior(params, z, ctx, anchor), torch.tensor(expected), rtol=1e-5, atol=1e-7
    )
    assert method.prior(params, z, ctx, {}) is None  # before any round starts: no anchor


def _batch(tower, n=5):
    gen = torch.Generator().manual_seed(2)
    x = torch.nn.functional.normalize(torch.randn(n, 64, generator=gen), dim=-1)
    y = torch.tensor([0, 1, 2, 3, 1])[:n]
    return x, torch.zeros(n, 0), y


@pytest.mark.parametrize(
    ("name", "anchor_shift"), [("kgcoop", None), ("fedprox", 0.05), ("fedpgp", None)]
)
def test_prior_gradient_is_separate_under_dp_and_summed_without(tiny_tower, name, anchor_shift):
    method, params, ctx = _setup(tiny_tower, name, **({"rank": 2} if name == "fedpgp" else {}))
    anchor = {} if anchor_shift is None else {"prompt": params["prompt"] + anchor_shift}
    batch = _batch(tiny_tower)

    def encode(p):
        return method.encode(p, {}, ctx)

    def loss_one(z, x, t, y):
        return method.sample_loss(z, x, t, y, ctx)

    def prior(z, p):
        return method.prior(p, z, ctx, anchor)

    # plain autograd reference: mean_i l_i + prior, and the prior alone
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    z = encode(p)
    losses = torch.stack([loss_one(z, *(t[i] for t in batch)) for i in range(len(batch[0]))])
    total = losses.mean() + prior(z, p)
    ref_total = dict(zip(p, torch.autograd.grad(total, list(p.values())), strict=True))
    p2 = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    ref_prior = dict(
        zip(p2, torch.autograd.grad(prior(encode(p2), p2), list(p2.values())), strict=True)
    )

    mean = step_gradients(encode, loss_one, params, batch, per_sample=False, prior=prior)
    private = step_gradients(encode, loss_one, params, batch, per_sample=True, prior=prior)
    assert mean.prior is None and private.prior is not None
    for k in params:
        torch.testing.assert_close(mean.data[k], ref_total[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(private.prior[k], ref_prior[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            private.data[k].mean(0) + private.prior[k], ref_total[k], rtol=1e-4, atol=1e-5
        )
