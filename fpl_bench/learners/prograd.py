"""ProGrad (Zhu, Niu, Han, Wu, Zhang, "Prompt-aligned Gradient for Prompt Tuning", ICCV 2023,
arXiv:2205.14865; reference BeierZhu/Prompt-align `ProGrad.public/trainers/prograd.py` and
`Dassl.ProGrad.pytorch/dassl/engine/trainer.py`, `prograd_backward_and_update`).

CoOp's context vectors, trained along the cross-entropy gradient G_d made not to conflict with
the "general knowledge" direction G_g, the gradient of the KL divergence from zero-shot CLIP's
prediction (the hand-crafted prompt "a photo of a {class}.") to the prompt's:

    L_kl = T^2 KL(softmax(z_zs / T) || softmax(z / T))            (the reference's T = 1)
    G = G_d                                            if G_d . G_g >= 0
    G = G_d - lambda (G_d . G_g / ||G_g||^2) G_g       otherwise   (lambda = 1)

The reference writes L_kl as the cross-entropy -sum softmax(z_zs / T) log softmax(z / T) T^2,
which differs from the KL by the zero-shot entropy, a constant: the same gradient. The
projection is invariant to the scale of G_g, so T^2 changes nothing there.

Where the projection runs (`combine_sample_grads`, fpl_bench/learners/_base.py): without DP on
the gradients of the batch-mean losses, as the reference does; under DP on each sample's own
G_d,i and G_g,i, before clipping: the projection is a data-dependent transform of a sample's
gradient, so it is part of that sample's clipped contribution (a batch-level G_g would mix the
samples' gradients before clipping). G is the vector of all the step's parameters jointly (the
paper's); the reference loops over parameter tensors, the same thing for CoOp's one context.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_bench.learners import LEARNERS
from fpl_bench.learners._base import (
    EncodeContext,
    InitContext,
    Params,
    PromptLearner,
    cosine_logits,
    template_features,
)

ZERO_SHOT = "prograd_zs_text"  # [n_cls, D] the hand-crafted prompt's class features


def zero_shot_kl(logits: Tensor, zs_logits: Tensor, temperature: float) -> Tensor:
    """T^2 KL(softmax(zs_logits / T) || softmax(logits / T)) over the last dim."""
    log_p = F.log_softmax(logits / temperature, dim=-1)
    log_q = F.log_softmax(zs_logits / temperature, dim=-1)
    return temperature**2 * (log_q.exp() * (log_q - log_p)).sum(-1)


def prograd_projection(
    g_d: Mapping[str, Tensor], g_g: Mapping[str, Tensor], *, lam: float
) -> Params:
    """G_d where G_d . G_g >= 0, else G_d - lam (G_d . G_g / ||G_g||^2) G_g; the dot products
    over all tensors jointly. Branch-free (vmapped per sample under DP); G_g = 0 gives G_d."""
    dot = torch.stack([(g_d[k] * g_g[k]).sum() for k in g_d]).sum()
    norm2 = torch.stack([g_g[k].pow(2).sum() for k in g_d]).sum()
    safe = torch.where(norm2 > 0, norm2, torch.ones_like(norm2))
    coef = torch.where(dot < 0, lam * dot / safe, torch.zeros_like(dot))
    return {k: g_d[k] - coef * g_g[k] for k in g_d}


@LEARNERS.register("prograd")
@dataclass(frozen=True)
class ProGrad(PromptLearner):
    """CoOp's context, its cross-entropy gradient projected off zero-shot CLIP's KL gradient."""

    lam: float  # lambda in the paper
    temperature: float  # T of the KL
    template: str  # the hand-crafted prompt of the zero-shot prediction

    def constants(self, init: InitContext) -> Params:
        return {ZERO_SHOT: template_features(init.tower, self.template)}

    def sample_losses(
        self,
        text: Tensor,
        image: Tensor,
        tokens: Tensor,
        label: Tensor,
        ctx: EncodeContext,
        given: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(cross-entropy, T^2 KL(zero-shot || prompt)) of one sample (text [1, n, D])."""
        logits = self.logits(text, image, tokens, ctx, given)  # [n]
        ce = F.cross_entropy(logits.unsqueeze(0), label.unsqueeze(0))
        zs = cosine_logits(ctx.consts[ZERO_SHOT][ctx.class_idx], image, ctx.tower.logit_scale)
        return ce, zero_shot_kl(logits, zs, self.temperature)

    def combine_sample_grads(self, grads: Mapping[str, Tensor]) -> Params:
        """`prograd_projection` of G_d = grads[:, 0] against G_g = grads[:, 1]."""
        g_d = {k: g[0] for k, g in grads.items()}
        g_g = {k: g[1] for k, g in grads.items()}
        return prograd_projection(g_d, g_g, lam=self.lam)
