"""FedPGP: the prompt equals sigma + U V; the contrastive loss against hand values."""

import math

import torch

from fpl_bench.learners._base import EncodeContext, InitContext
from fpl_bench.method import method_from_name
from fpl_bench.schemes.sigma_uv import SigmaUV, contrastive_loss


def test_contrastive_loss_hand_value():
    f_init = torch.tensor([[1.0, 0.0]])
    f_sigma = torch.tensor([[1.0, 0.0]])
    f_full = torch.tensor([[0.0, 1.0]])
    # pos = 1, neg = 0, temp 0.5 -> logits [2, 0]; CE = -log(e^2 / (e^2 + 1))
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert math.isclose(
        float(contrastive_loss(f_init, f_sigma, f_full, temperature=0.5)), expected, rel_tol=1e-6
    )


def test_full_prompt_features_equal_sigma_plus_uv(tiny_tower):
    method = method_from_name("fedpgp", {"rank": 2})
    init = InitContext(tower=tiny_tower, generator=torch.Generator().manual_seed(0))
    params, consts = method.init(init)
    ctx = EncodeContext(tower=tiny_tower, class_idx=torch.tensor([0, 2]), consts=consts)
    z = method.encode(params, {}, ctx)
    torch.testing.assert_close(
        z["text"][0],
        tiny_tower.encode(params["sigma"] + params["U"] @ params["V"], ctx.class_idx),
        rtol=1e-5,
        atol=1e-6,
    )
    torch.testing.assert_close(
        z["sigma"], tiny_tower.encode(params["sigma"], ctx.class_idx), rtol=1e-5, atol=1e-6
    )
    assert consts["sigma_uv_f_init"].shape == (tiny_tower.n_classes, 64)
    assert SigmaUV.shared == ("sigma",)


def test_prior_is_mu_times_the_contrastive_loss_of_the_encoded_features(tiny_tower):
    method = method_from_name("fedpgp", {"rank": 2, "mu": 0.7})
    init = InitContext(tower=tiny_tower, generator=torch.Generator().manual_seed(0))
    params, consts = method.init(init)
    ctx = EncodeContext(tower=tiny_tower, class_idx=torch.tensor([1, 3]), consts=consts)
    z = method.encode(params, {}, ctx)
    expected = 0.7 * contrastive_loss(
        consts["sigma_uv_f_init"][ctx.class_idx], z["sigma"], z["text"][0], temperature=0.5
    )
    torch.testing.assert_close(method.prior(params, z, ctx, {}), expected)
