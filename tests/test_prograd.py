"""ProGrad against its reference, written here: the projection equation on small tensors, the KL
term's gradient (the reference's cross-entropy form), exact per-sample projected gradients under
DP (float64, against one ordinary backward of each loss per sample, projected per sample), the
non-private step against the reference's batch-level projection (`prograd_backward_and_update`),
the driver's steps (one client and clients batched) against both, and a run by name without DP
and under DP with both trust models."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_bench.driver import FederatedRun, NoisePlan, Schedule
from fpl_bench.learners import LEARNERS
from fpl_bench.learners._base import EncodeContext, InitContext, PromptLearner
from fpl_bench.learners.prograd import ZERO_SHOT, prograd_projection, zero_shot_kl
from fpl_bench.method import method_from_name
from fpl_bench.privacy.per_sample import client_step_gradients, step_gradients
from fpl_bench.text_tower import TextTower
from tests.test_driver import make_federation


def project(g_d: Tensor, g_g: Tensor, lam: float) -> Tensor:
    """The paper's rule on flat vectors, as written: G_d unless G_d . G_g < 0."""
    dot = float(g_d @ g_g)
    if dot >= 0:
        return g_d
    return g_d - lam * dot / float(g_g @ g_g) * g_g


def flat(grads: dict[str, Tensor]) -> Tensor:
    return torch.cat([g.flatten() for g in grads.values()])


def reference_losses(tower, prompt, image, label, zs_text, class_idx, temperature=1.0):
    """CustomCLIP.forward + ProGradLoss for a batch: cross-entropy and the reference's
    -sum softmax(zs / T) log softmax(z / T) T^2, both batch means."""
    text = tower.encode(prompt, class_idx)
    text = text / text.norm(dim=-1, keepdim=True)
    image = image / image.norm(dim=-1, keepdim=True)
    logits = tower.logit_scale * image @ text.t()
    zs_logits = tower.logit_scale * image @ zs_text[class_idx].t()
    xe = F.cross_entropy(logits, label)
    tea = F.softmax(zs_logits / temperature, dim=-1)
    kl = (-tea * F.log_softmax(logits / temperature, -1) * temperature**2).sum(1).mean()
    return xe, kl


def reference_batch_projection(g_d: Tensor, g_g: Tensor, lam: float) -> Tensor:
    """Dassl's `prograd_backward_and_update` on one parameter tensor (CoOp's context)."""
    b_norm = g_g / torch.linalg.norm(g_g)
    a_norm = g_d / torch.linalg.norm(g_d)
    if torch.dot(a_norm.flatten(), b_norm.flatten()) < 0:
        return g_d - lam * torch.dot(g_d.flatten(), b_norm.flatten()) * b_norm
    return g_d


def test_projection_is_the_papers_equation_on_small_tensors():
    g = torch.Generator().manual_seed(0)
    for lam in (1.0, 0.5, 0.0):
        for _ in range(20):
            g_d = {"a": torch.randn(3, generator=g), "b": torch.randn(2, 2, generator=g)}
            g_g = {"a": torch.randn(3, generator=g), "b": torch.randn(2, 2, generator=g)}
            got = prograd_projection(g_d, g_g, lam=lam)
            want = project(flat(g_d), flat(g_g), lam)
            torch.testing.assert_close(flat(got), want, rtol=1e-6, atol=1e-6)
            if lam == 1.0 and float(flat(g_d) @ flat(g_g)) < 0:  # orthogonal to G_g after it
                assert abs(float(flat(got) @ flat(g_g))) < 1e-5
    g_d = {"a": torch.tensor([1.0, 2.0])}
    assert torch.equal(prograd_projection(g_d, {"a": torch.zeros(2)}, lam=1.0)["a"], g_d["a"])
    same = prograd_projection(g_d, {"a": torch.tensor([2.0, -1.0])}, lam=1.0)  # dot 0: kept
    assert torch.equal(same["a"], g_d["a"])
    got = prograd_projection(g_d, {"a": torch.tensor([-1.0, 0.0])}, lam=1.0)
    assert torch.equal(got["a"], torch.tensor([0.0, 2.0]))
    rows = {"a": torch.randn(5, 3, generator=g)}, {"a": torch.randn(5, 3, generator=g)}
    batched = torch.vmap(lambda d, gg: prograd_projection(d, gg, lam=1.0))(*rows)["a"]
    for i in range(5):  # branch-free: vmapped per sample, each row takes its own branch
        torch.testing.assert_close(batched[i], project(rows[0]["a"][i], rows[1]["a"][i], 1.0))


def test_kl_has_the_gradient_of_the_references_cross_entropy_form():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    zs = torch.randn(7, generator=g, dtype=torch.float64)
    for t in (1.0, 2.5):
        (got,) = torch.autograd.grad(zero_shot_kl(logits, zs, t), logits)
        ref = (-F.softmax(zs / t, -1) * F.log_softmax(logits / t, -1) * t * t).sum()
        (want,) = torch.autograd.grad(ref, logits)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert float(zero_shot_kl(zs, zs, 1.0)) == pytest.approx(0.0, abs=1e-12)


def test_the_seam_is_taken_only_by_a_learner_with_several_losses():
    """Every other learner keeps the one-loss path (bit-identical presets); the default rule
    is the gradient of the sum of the losses."""
    base = PromptLearner.sample_losses
    several = [n for n in LEARNERS.names() if LEARNERS.get(n).sample_losses is not base]
    assert several == ["prograd"]
    assert method_from_name("prograd").has_several_losses
    assert not method_from_name("coop").has_several_losses
    grads = {"a": torch.tensor([[1.0, 2.0], [3.0, -5.0]])}  # [L = 2, 2]
    assert torch.equal(PromptLearner().combine_sample_grads(grads)["a"], torch.tensor([4.0, -3.0]))


def double_case(tiny_model, lam=1.0):
    """ProGrad on a float64 copy of the tiny tower, 4 classes, 7 images (2 of class 0)."""
    model, tokenizer = tiny_model
    names = ["red circle", "dark blue square", "green triangle", "yellow star"]
    tower = TextTower.build(copy.deepcopy(model).double(), tokenizer, names, n_ctx=4)
    method = method_from_name("prograd", {"lam": lam})
    params, consts = method.init(InitContext(tower, torch.Generator().manual_seed(0)))
    params = {k: v.double() for k, v in params.items()}
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(7, tower.feature_dim, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 1, 2, 0, 3])
    ctx = EncodeContext(tower, torch.arange(4), consts)

    def encode(p: dict[str, Tensor], *_: object) -> object:
        return method.encode(p, {}, ctx)

    def losses(z, x, t, y):
        return method.sample_loss(z, x, t, y, ctx, several=True)

    batch = (images, images.new_zeros(7, 0), labels)
    return tower, method, params, ctx, encode, losses, batch


def reference_sample_grads(tower, params, ctx, batch, lam):
    """Each sample's G_d and G_g by an ordinary backward of each loss, projected by `project`;
    returns (projected [B, *shape], number of samples whose gradients conflicted)."""
    images, _, labels = batch
    rows, conflicts = [], 0
    for i in range(len(labels)):
        leaf = params["prompt"].clone().requires_grad_(True)
        xe, kl = reference_losses(
            tower, leaf, images[i : i + 1], labels[i : i + 1], ctx.consts[ZERO_SHOT], ctx.class_idx
        )
        (g_d,) = torch.autograd.grad(xe, leaf, retain_graph=True)
        (g_g,) = torch.autograd.grad(kl, leaf)
        conflicts += float(g_d.flatten() @ g_g.flatten()) < 0
        rows.append(project(g_d.flatten(), g_g.flatten(), lam).view_as(g_d))
    return torch.stack(rows), conflicts


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_private_per_sample_projection_equals_a_backward_per_sample_in_float64(tiny_model, lam):
    tower, method, params, ctx, encode, losses, batch = double_case(tiny_model, lam)
    want, conflicts = reference_sample_grads(tower, params, ctx, batch, lam)
    assert 0 < conflicts < len(batch[2])  # both branches taken
    combine = method.combine_sample_grads
    got = step_gradients(encode, losses, params, batch, per_sample=True, combine=combine)
    assert got.prior is None and got.losses.shape == (7,)
    torch.testing.assert_close(got.data["prompt"], want, rtol=1e-10, atol=1e-12)
    loop = step_gradients(
        encode, losses, params, batch, per_sample=True, combine=combine, per_sample_loop=True
    )
    torch.testing.assert_close(loop.data["prompt"], want, rtol=1e-10, atol=1e-12)
    # two clients in one forward (unequal batches: client 1 holds the first 4 samples)
    stacked = {k: torch.stack([v, v]) for k, v in params.items()}
    two = tuple(torch.stack([t, t]) for t in batch)
    both = client_step_gradients(
        encode, losses, stacked, {}, two, [7, 4], per_sample=True, combine=combine
    )
    torch.testing.assert_close(both.data["prompt"][0], want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(both.data["prompt"][1, :4], want[:4], rtol=1e-10, atol=1e-12)
    assert not both.data["prompt"][1, 4:].any()
    torch.testing.assert_close(both.losses[0], got.losses)


def test_non_private_step_is_the_references_batch_level_projection(tiny_model):
    tower, method, params, ctx, encode, losses, batch = double_case(tiny_model)
    images, _, labels = batch

    def reference(n: int) -> Tensor:
        leaf = params["prompt"].clone().requires_grad_(True)
        xe, kl = reference_losses(
            tower, leaf, images[:n], labels[:n], ctx.consts[ZERO_SHOT], ctx.class_idx
        )
        (g_d,) = torch.autograd.grad(xe, leaf, retain_graph=True)
        (g_g,) = torch.autograd.grad(kl, leaf)
        return reference_batch_projection(g_d, g_g, 1.0), float(g_d.flatten() @ g_g.flatten())

    want, dot = reference(3)
    assert dot < 0 and reference(7)[1] > 0  # projected on the first 3 samples, not on all 7
    combine = method.combine_sample_grads
    three = tuple(t[:3] for t in batch)
    got = step_gradients(encode, losses, params, three, per_sample=False, combine=combine)
    torch.testing.assert_close(got.data["prompt"], want, rtol=1e-10, atol=1e-12)
    per_sample = step_gradients(encode, losses, params, three, per_sample=True, combine=combine)
    assert (per_sample.data["prompt"].mean(0) - want).abs().max() > 1e-6  # not the same rule
    stacked = {k: torch.stack([v, v]) for k, v in params.items()}
    two = tuple(torch.stack([t, t]) for t in batch)
    both = client_step_gradients(
        encode, losses, stacked, {}, two, [3, 7], per_sample=False, combine=combine
    )
    torch.testing.assert_close(both.data["prompt"][0], want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(both.data["prompt"][1], reference(7)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("private", [False, True])
def test_the_driver_steps_project_per_sample_under_dp_and_per_batch_without(tiny_tower, private):
    fed, schedule = make_federation(tiny_tower), Schedule(rounds=1, batch_size=8, lr=0.1)
    method = method_from_name("fedprograd")
    run = FederatedRun(method, tiny_tower, fed, schedule=schedule, seed=0, trust="server")
    if private:
        run.enable_privacy(NoisePlan(noise_multiplier=1.0, clip_norm=1.0))
    idx = [run.train_idx[c][:5] for c in (0, 1)]
    batched = run.steps_computer.batched([0, 1], 0, 0, idx)
    conflicts = 0
    for c in (0, 1):
        step, g = run.steps_computer.one(c, 0, 0, idx[c])
        _, _, batch = run.step_inputs(c, 0, 0, idx[c])
        if private:
            want, n = reference_sample_grads(tiny_tower, step, run.ctx_seen, batch, 1.0)
            conflicts += n
        else:
            images, _, labels = batch
            leaf = step["prompt"].clone().requires_grad_(True)
            zs = run.ctx_seen.consts[ZERO_SHOT]
            xe, kl = reference_losses(tiny_tower, leaf, images, labels, zs, run.ctx_seen.class_idx)
            g_d, g_g = (
                torch.autograd.grad(xe, leaf, retain_graph=True)[0],
                torch.autograd.grad(kl, leaf)[0],
            )
            want = reference_batch_projection(g_d, g_g, 1.0)
            conflicts += float(g_d.flatten() @ g_g.flatten()) < 0
        for got in (g.data["prompt"], batched[c][1].data["prompt"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert 0 < conflicts < (10 if private else 2)  # both branches of the rule are taken
