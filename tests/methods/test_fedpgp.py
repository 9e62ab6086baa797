"""FedPGP: the prompt equals sigma + U V; the contrastive loss against hand values."""

import math

import torch

from fpl_bench.methods.base import EncodeContext, InitContext
from fpl_bench.methods.fedpgp import FedPGP, contrastive_loss


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
    method = FedPGP(rank=2)
    init = InitContext(tower=tiny_tower, generator=torch.Generator().manual_seed(0))
    params = method.init_params(init)
    consts = method.constants(init)
    ctx = EncodeContext(tower=tiny_tower, class_idx=torch.tensor([0, 2]), consts=consts)
    z = method.encode(params, {}, ctx)
    torch.testing.assert_close(
        z["full"], tiny_tower.encode(params["sigma"] + params["U"] @ params["V"], ctx.class_idx)
    )
    torch.testing.assert_close(z["sigma"], tiny_tower.encode(params["sigma"], ctx.class_idx))
    assert z["init"].shape == (2, 64)
    assert FedPGP.shared == ("sigma",) and set(FedPGP.privacy.client) == {"sigma", "U", "V"}
