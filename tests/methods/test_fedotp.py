"""FedOTP: OT logits against a hand value, shapes, and exact per-sample gradients."""

import torch
import torch.nn.functional as F

from fpl_bench.methods.base import EncodeContext, InitContext
from fpl_bench.methods.fedotp import FedOTP
from fpl_bench.privacy.per_sample import per_sample_grads


def test_identical_patches_give_plain_cosine_logits(tiny_tower):
    method = FedOTP(top_percent=1.0)
    params = method.init_params(
        InitContext(tower=tiny_tower, generator=torch.Generator().manual_seed(0))
    )
    params["p_local"] = params["p_global"].clone()
    ctx = EncodeContext(tower=tiny_tower, class_idx=torch.arange(tiny_tower.n_classes))
    text = method.encode(params, {}, ctx)  # [2, n, D]
    token = F.normalize(torch.randn(64), dim=0)
    tokens = token.expand(1, 5, 64)  # every patch the same token
    logits = method.logits(text, token[None], tokens, ctx)
    # uniform plan with total mass 1 -> logit = scale * cos(token, text_c)
    expected = tiny_tower.logit_scale * text[0] @ token
    torch.testing.assert_close(logits[0], expected, rtol=1e-5, atol=1e-5)


def test_per_sample_gradients_match_a_loop(tiny_tower):
    method = FedOTP()
    params = method.init_params(
        InitContext(tower=tiny_tower, generator=torch.Generator().manual_seed(0))
    )
    ctx = EncodeContext(tower=tiny_tower, class_idx=torch.arange(4))
    gen = torch.Generator().manual_seed(1)
    tokens = F.normalize(torch.randn(3, 5, 64, generator=gen), dim=-1)
    pooled = tokens.mean(1)
    labels = torch.tensor([0, 3, 1])

    def encode(p):
        return method.encode(p, {}, ctx)

    def loss(z, x, t, y):
        return method.sample_loss(z, x, t, y, ctx)

    grads, losses = per_sample_grads(encode, loss, params, (pooled, tokens, labels))
    for i in range(3):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        li = loss(encode(p), pooled[i], tokens[i], labels[i])
        gi = torch.autograd.grad(li, list(p.values()))
        for (name, _), g in zip(p.items(), gi, strict=True):
            torch.testing.assert_close(grads[name][i], g, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(losses[i], li.detach())
