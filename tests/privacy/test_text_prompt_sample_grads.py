"""Exact per-sample gradients of the text-prompt learners whose other tests run in float32 or
check only a batch mean: CoOp (PromptFL's learner), KgCoOp and FedOTP's OT learner, each row
against one ordinary backward per sample in float64. CoOp and KgCoOp are written out here from
their papers (cross-entropy on s cos(g(t_c), f(x)); KgCoOp's lambda mean_c ||w_c - w_clip_c||^2
prior, which reads no record, returned apart and equal to its own gradient); the OT learner is
looped through the method itself, one sample per backward (its plans, as the reference's, are
constants of the step)."""

import pytest
import torch
import torch.nn.functional as F

from fpl_bench.learners._base import EncodeContext, InitContext
from fpl_bench.method import method_from_name
from fpl_bench.privacy.per_sample import step_gradients
from tests.test_cocoop import tower64  # noqa: F401  (a float64 tiny tower, module fixture)

CLASSES = torch.arange(4)
B = 5


def start(tower, name, seed=0):
    method = method_from_name(name)
    gen = torch.Generator().manual_seed(seed)
    params, consts = method.init(InitContext(tower, gen))
    params = {k: (v.double() + 0.05 * torch.randn(v.shape, generator=gen, dtype=torch.float64))
              for k, v in params.items()}  # fmt: skip
    consts = {k: v.double() if v.is_floating_point() else v for k, v in consts.items()}
    return method, params, consts


def batch(tower, *, patches=0, seed=1):
    gen = torch.Generator().manual_seed(seed)
    images = F.normalize(
        torch.randn(B, tower.feature_dim, generator=gen, dtype=torch.float64), dim=-1
    )
    tokens = F.normalize(
        images[:, None] + 0.5 * torch.randn(B, patches, tower.feature_dim, generator=gen, dtype=torch.float64),
        dim=-1,
    )  # fmt: skip
    return images, tokens, torch.tensor([0, 3, 1, 1, 2])


def rows(method, step, aux, ctx, data, *, prior=None):
    def loss_one(z, x, t, y, *given):
        return method.sample_loss(z, x, t, y, ctx, *given)

    def constants(z, x, t, y):
        return method.batch_constants(z, t, ctx)

    return step_gradients(
        lambda p: method.encode(p, aux, ctx),
        loss_one,
        step,
        data,
        per_sample=True,
        prior=prior,
        constants=constants,
    )


def paper_cross_entropy(tower, prompt, image, label):
    """CoOp's loss of one sample: -log softmax_y(s cos(g(t_c(prompt)), f(x)))."""
    text = tower.encode(prompt, CLASSES)  # [n, D], normalised
    logits = tower.logit_scale * (text @ F.normalize(image, dim=-1))
    return F.cross_entropy(logits[None], label[None])


@pytest.mark.parametrize("name", ["coop", "kgcoop"])
def test_coop_and_kgcoop_rows_are_the_papers_gradient_per_sample(tower64, name):  # noqa: F811
    method, params, consts = start(tower64, name)
    ctx = EncodeContext(tower64, CLASSES, consts)
    step, aux = method.step_params(params, torch.Generator())
    data = batch(tower64)

    def prior(z, p):
        return method.prior(p, z, ctx, {})

    got = rows(method, step, aux, ctx, data, prior=prior)
    assert set(got.data) == {"prompt"} and got.data["prompt"].shape[0] == B
    for i in range(B):
        leaf = params["prompt"].clone().requires_grad_(True)
        paper_cross_entropy(tower64, leaf, data[0][i], data[2][i]).backward()
        torch.testing.assert_close(got.data["prompt"][i], leaf.grad, rtol=1e-10, atol=1e-13)
    assert (got.data["prompt"][0] - got.data["prompt"][1]).abs().max() > 1e-6  # rows differ
    if name == "coop":
        assert got.prior is None
        return
    leaf = params["prompt"].clone().requires_grad_(True)
    w_clip = consts["kgcoop_clip_text"][CLASSES]
    lam = method.learner.lam
    (lam * (tower64.encode(leaf, CLASSES) - w_clip).pow(2).sum(-1).mean()).backward()
    assert lam == 8.0 and float(leaf.grad.abs().max()) > 0
    torch.testing.assert_close(got.prior["prompt"], leaf.grad, rtol=1e-10, atol=1e-13)


def test_ot_learner_rows_are_one_backward_per_sample(tower64):  # noqa: F811
    method, params, consts = start(tower64, "fedotp")
    ctx = EncodeContext(tower64, CLASSES, consts)
    step, aux = method.step_params(params, torch.Generator())
    data = batch(tower64, patches=6)
    got = rows(method, step, aux, ctx, data)
    assert got.data and all(g.shape[0] == B for g in got.data.values())
    for i in range(B):
        leaves = {k: v.clone().requires_grad_(True) for k, v in step.items()}
        z = method.encode(leaves, aux, ctx)
        x, t, y = (d[i] for d in data)
        with torch.no_grad():  # the sample's own transport constants, from the sample alone
            detached = method.encode({k: v.detach() for k, v in leaves.items()}, aux, ctx)
            given = method.batch_constants(detached, t[None], ctx)
        extra = () if given is None else (given[0],)
        names = list(leaves)
        grads = torch.autograd.grad(
            method.sample_loss(z, x, t, y, ctx, *extra), [leaves[k] for k in names]
        )
        for k, g in zip(names, grads, strict=True):
            torch.testing.assert_close(got.data[k][i], g, rtol=1e-10, atol=1e-13)
    assert any(float(g.abs().max()) > 0 for g in got.data.values())
