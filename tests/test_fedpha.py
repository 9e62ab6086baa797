"""FedPHA against its reference's forward pass and loss (GL_SVDMSE), written here: the SVD
projection of the local prompt on the global prompt's directions, the local prompt's logits,
the loss (two cross-entropies, pull and push) and its gradient through the SVD, exact
per-sample gradients of both prompts with the alignment terms as a prior outside clipping
(float64, against one ordinary backward per sample), what reaches the server, the pairs it
refuses (by name through the CLI: tests/test_new_presets_cli.py)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_bench.driver import FederatedRun, NoisePlan, Schedule
from fpl_bench.learners import LEARNERS
from fpl_bench.learners._base import EncodeContext, InitContext
from fpl_bench.method import method_from_name, pair_problem
from fpl_bench.privacy.per_sample import step_gradients
from fpl_bench.schemes import SCHEMES
from fpl_bench.schemes.fedpha import minor_directions
from fpl_bench.text_tower import TextTower
from tests.test_driver import make_federation


def null_space(p_global: Tensor, ratio: float) -> Tensor:
    """The reference's compute_null_space: torch.svd (thin), V[:, int(len(S) (1 - ratio)):]."""
    _, s, v = torch.svd(p_global.reshape(-1, p_global.shape[-1]))
    return v[:, int(s.shape[0] * (1 - ratio)) :]


def reference_terms(tower, p_global, p_local, images, labels, class_idx, ratio, alpha):
    """(local logits, loss) of GL_SVDMSE.forward_backward: CE(local) + CE(global) +
    MSE(f(p_L), f(p_L V2 V2^T)) + mean relu(alpha - ||f(p_L) - f(p_G)||)."""

    def features(p):
        return F.normalize(tower.encode(p, class_idx), dim=-1)

    v2 = null_space(p_global, ratio)
    local, global_ = features(p_local), features(p_global)
    projected = features(p_local @ (v2 @ v2.T))
    image = F.normalize(images, dim=-1)
    scale = tower.logit_scale
    output, output_global = scale * image @ local.t(), scale * image @ global_.t()
    pull = F.mse_loss(local, projected)
    push = F.relu(alpha - torch.norm(local - global_, dim=-1)).mean()
    loss = F.cross_entropy(output, labels) + F.cross_entropy(output_global, labels) + pull + push
    return output, loss, pull + push


def test_minor_directions_are_the_references_null_space():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(16, 40, generator=gen, dtype=torch.float64)
    for ratio, kept in [(0.8, 13), (0.5, 8), (1.0, 16)]:  # 16 - int(16 (1 - ratio)) columns
        got, want = minor_directions(p, ratio), null_space(p, ratio)
        assert got.shape == want.shape == (40, kept)
        torch.testing.assert_close(got @ got.T, want @ want.T)  # the same projector
    # the reference's truncation, not rounding: int(5 * 0.2) = int(0.999...) = 0
    assert minor_directions(p[:5], 0.8).shape == (40, 5)


@pytest.fixture
def double_tower(tiny_model):
    model, tokenizer = tiny_model
    names = ["red circle", "dark blue square", "green triangle", "yellow star"]
    return TextTower.build(copy.deepcopy(model).double(), tokenizer, names, n_ctx=4)


def fedpha_setup(tower, options=None):
    method = method_from_name("fedpha", options or {"ratio": 0.5, "alpha": 1.5})
    gen = torch.Generator().manual_seed(0)
    params, consts = method.init(InitContext(tower, gen))
    params = {k: v.to(torch.float64) for k, v in params.items()}
    images = torch.randn(5, tower.feature_dim, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 1, 2])
    return method, params, EncodeContext(tower, torch.arange(4), consts), images, labels


def test_logits_loss_and_its_gradient_through_the_svd_are_the_references(double_tower):
    method, params, ctx, images, labels = fedpha_setup(double_tower)
    assert not torch.equal(params["p_global"], params["p_local"])
    encoded = method.encode(params, {}, ctx)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    want_logits, want_loss, _ = reference_terms(
        double_tower, leaves["p_global"], leaves["p_local"], images, labels, ctx.class_idx,
        0.5, 1.5,
    )  # fmt: skip
    torch.testing.assert_close(method.logits(encoded, images, None, ctx), want_logits)
    pairs = zip(images, labels, strict=True)
    per_sample = torch.stack([method.sample_loss(encoded, x, x[:0], y, ctx) for x, y in pairs])
    got_loss = per_sample.mean() + method.prior(params, encoded, ctx, {})
    torch.testing.assert_close(got_loss, want_loss)
    want_loss.backward()

    def encode(p: dict[str, Tensor]) -> object:
        return method.encode(p, {}, ctx)

    def loss_one(z, x, t, y):
        return method.sample_loss(z, x, t, y, ctx)

    def prior(z, p):
        return method.prior(p, z, ctx, {})

    batch = (images, images.new_zeros(5, 0), labels)
    got = step_gradients(encode, loss_one, params, batch, per_sample=False, prior=prior)
    for k, leaf in leaves.items():  # p_G's includes the pull term's path through the SVD
        torch.testing.assert_close(got.data[k], leaf.grad, rtol=1e-9, atol=1e-11)


def test_per_sample_gradients_and_the_prior_outside_clipping_in_float64(double_tower):
    method, params, ctx, images, labels = fedpha_setup(double_tower)

    def encode(p: dict[str, Tensor]) -> object:
        return method.encode(p, {}, ctx)

    def loss_one(z, x, t, y):
        return method.sample_loss(z, x, t, y, ctx)

    def prior(z, p):
        return method.prior(p, z, ctx, {})

    batch = (images, images.new_zeros(5, 0), labels)
    got = step_gradients(encode, loss_one, params, batch, per_sample=True, prior=prior)
    assert set(got.data) == {"p_global", "p_local"} and got.prior is not None
    for i in range(len(labels)):  # the two cross-entropies of one sample, one backward
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        _, loss, align = reference_terms(
            double_tower, leaves["p_global"], leaves["p_local"], images[i : i + 1],
            labels[i : i + 1], ctx.class_idx, 0.5, 1.5,
        )  # fmt: skip
        (loss - align).backward()
        for k, leaf in leaves.items():
            torch.testing.assert_close(got.data[k][i], leaf.grad, rtol=1e-9, atol=1e-11)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    _, _, align = reference_terms(
        double_tower, leaves["p_global"], leaves["p_local"], images, labels, ctx.class_idx,
        0.5, 1.5,
    )  # fmt: skip
    align.backward()  # pull + push reads no record: the prior, once, not per sample
    for k, leaf in leaves.items():
        torch.testing.assert_close(got.prior[k], leaf.grad, rtol=1e-9, atol=1e-11)
        assert leaf.grad.abs().max() > 0, k


@pytest.mark.parametrize("trust", ["server", "client"])
def test_only_the_global_prompt_reaches_the_server(tiny_tower, trust):
    fed = make_federation(tiny_tower)
    sched = Schedule(rounds=1, batch_size=8, lr=0.1)
    run = FederatedRun(method_from_name("fedpha"), tiny_tower, fed, schedule=sched, seed=0)
    assert run.method.shared == ("p_global",) and set(run.server) == {"p_global"}
    run = FederatedRun(
        method_from_name("fedpha"), tiny_tower, fed, schedule=sched, seed=0, trust=trust
    )
    run.enable_privacy(NoisePlan(noise_multiplier=1.0, clip_norm=1.0))
    folio = FederatedRun(
        method_from_name("promptfolio"), tiny_tower, fed, schedule=sched, seed=0, trust=trust
    )
    folio.enable_privacy(NoisePlan(noise_multiplier=1.0, clip_norm=1.0))
    assert run.placement == folio.placement  # global_local's placement
    assert (run.placement.server, run.placement.client) == (
        (("p_global",), ("p_local",)) if trust == "server" else ((), ("p_global", "p_local"))
    )
    assert run.budget() == folio.budget()
    run.run_round(0)
    views = [run.view(c, evaluation=True) for c in range(2)]
    assert torch.equal(views[0]["p_global"], views[1]["p_global"])
    assert not torch.equal(views[0]["p_local"], views[1]["p_local"])


def test_pairs():
    scheme = SCHEMES.get("fedpha")
    for ok in ("coop", "kgcoop"):
        assert pair_problem(LEARNERS.get(ok), scheme) is None
    for name in ("cocoop", "ot", "plot", "maple"):  # refused, by the first reason that applies
        assert pair_problem(LEARNERS.get(name), scheme) is not None, name
    assert "its own sample_losses" in pair_problem(LEARNERS.get("prograd"), scheme)
