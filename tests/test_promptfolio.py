"""PromptFolio against its reference's forward pass, written here: the portfolio of the global
and local prompts' normalised text features on small tensors and through the tiny tower (its
logits are the theta-mix of the two prompts' logits), exact per-sample gradients of both prompts
(float64, against one ordinary backward per sample), which prompt the server sees, and a run by
name without DP and under DP with both trust models."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_bench.learners import LEARNERS
from fpl_bench.learners._base import EncodeContext, InitContext
from fpl_bench.method import method_from_name, pair_problem
from fpl_bench.privacy.per_sample import step_gradients
from fpl_bench.schemes import SCHEMES
from fpl_bench.schemes.promptfolio import PromptFolio
from fpl_bench.text_tower import TextTower


def reference_logits(tower, p_global, p_local, images, class_idx, theta):
    """PromptFolioCLIP.forward: each prompt's class features L2-normalised, mixed as
    (1 - theta) global + theta local, scored against the normalised images."""
    t0 = tower.encode(p_global, class_idx)
    t1 = tower.encode(p_local, class_idx)
    t0, t1 = t0 / t0.norm(dim=-1, keepdim=True), t1 / t1.norm(dim=-1, keepdim=True)
    text = (1 - theta) * t0 + theta * t1
    return tower.logit_scale * F.normalize(images, dim=-1) @ text.t()


def test_mix_text_is_the_portfolio_of_the_two_feature_sets():
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.6, 0.8]]])  # [2, n=2, D=2]
    got = PromptFolio(theta=0.25).mix_text(text)
    want = torch.tensor([[[0.75, 0.25], [0.15, 0.95]]])
    torch.testing.assert_close(got, want)
    assert torch.equal(PromptFolio(theta=0.0).mix_text(text)[0], text[0])
    assert torch.equal(PromptFolio(theta=1.0).mix_text(text)[0], text[1])


@pytest.mark.parametrize("theta", [0.0, 0.4, 1.0])
def test_logits_are_the_references_and_the_mix_of_the_two_prompts_logits(tiny_tower, theta):
    method = method_from_name("promptfolio", {"theta": theta})
    params, consts = method.init(InitContext(tiny_tower, torch.Generator().manual_seed(0)))
    assert not torch.equal(params["p_global"], params["p_local"])
    ctx = EncodeContext(tiny_tower, torch.tensor([0, 2, 5]), consts)
    dim = tiny_tower.feature_dim
    images = torch.randn(4, dim, generator=torch.Generator().manual_seed(1))
    encoded = method.encode(params, {}, ctx)
    assert encoded["text"].shape == (1, 3, dim)
    got = method.logits(encoded, images, None, ctx)
    p_g, p_l = params["p_global"], params["p_local"]
    want = reference_logits(tiny_tower, p_g, p_l, images, ctx.class_idx, theta)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    one = method_from_name("promptfl")  # the CoOp learner scoring one prompt
    each = [one.logits(one.encode({"prompt": p}, {}, ctx), images, None, ctx) for p in (p_g, p_l)]
    torch.testing.assert_close(got, (1 - theta) * each[0] + theta * each[1], rtol=1e-5, atol=1e-5)


def test_per_sample_gradients_of_both_prompts_equal_a_backward_per_sample_in_float64(tiny_model):
    model, tokenizer = tiny_model
    names = ["red circle", "dark blue square", "green triangle", "yellow star"]
    tower = TextTower.build(copy.deepcopy(model).double(), tokenizer, names, n_ctx=4)
    method = method_from_name("promptfolio", {"theta": 0.3})
    params, consts = method.init(InitContext(tower, torch.Generator().manual_seed(0)))
    params = {k: v.double() for k, v in params.items()}
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(5, tower.feature_dim, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 1, 2])
    ctx = EncodeContext(tower, torch.arange(4), consts)

    def encode(p: dict[str, Tensor]) -> object:
        return method.encode(p, {}, ctx)

    def loss_one(z, x, t, y):
        return method.sample_loss(z, x, t, y, ctx)

    batch = (images, images.new_zeros(5, 0), labels)
    got = step_gradients(encode, loss_one, params, batch, per_sample=True)
    assert set(got.data) == {"p_global", "p_local"}
    for i in range(len(labels)):  # the reference's loss, one sample, one ordinary backward
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        logits = reference_logits(
            tower, leaves["p_global"], leaves["p_local"], images[i : i + 1], ctx.class_idx, 0.3
        )
        F.cross_entropy(logits, labels[i : i + 1]).backward()
        for k, leaf in leaves.items():
            torch.testing.assert_close(got.data[k][i], leaf.grad, rtol=1e-10, atol=1e-12)


def test_only_the_global_prompt_is_shared_and_image_conditioned_learners_are_refused():
    method = method_from_name("promptfolio")
    assert method.shared == ("p_global",) and method.scheme.n_prompts == 2
    scheme = SCHEMES.get("promptfolio")
    assert pair_problem(LEARNERS.get("coop"), scheme) is None
    assert pair_problem(LEARNERS.get("kgcoop"), scheme) is None
    for name in ("cocoop", "maple"):
        assert "mixes its prompt components' text features" in pair_problem(
            LEARNERS.get(name), scheme
        )
