"""FedPHA (Fang, Huang, Wan, Yang, Ye, "FedPHA: Federated Prompt Learning for Heterogeneous
Client Adaptation", ICML 2025, PMLR 267:15960-15975; reference CYFang6/FedPHA, trainer
`GL_SVDMSE`, whose source is read from the fork caizly678-dotcom/FedPHA `trainers/GL_SVDMSE.py`
(its non-"SPF" path) and the port Yuqin-G/PMFLT `model/FedPHA.py`, `federated/client_fedpha.py`,
which agree on all that follows).

Each client holds a global prompt p_G, averaged by the server (FedAvg weighted by sample count,
as `global_local`), and a local prompt p_L that never leaves it. With f(p) the L2-normalised
class text features of prompt p, x^ the normalised image feature and s the logit scale:

    SVD projection   p_G = U S V^T (thin SVD of the [n_ctx, W] prompt, S descending),
                     V_2 = the columns of V after the first floor(n_ctx (1 - ratio)),
                     p_P = p_L V_2 V_2^T           (p_L projected on those directions of p_G)
    scoring          logit_c = s <x^, f(p_L)_c>     (the local prompt alone, in evaluation too)
    per-sample loss  CE(s x^ f(p_L)^T, y) + CE(s x^ f(p_G)^T, y)
    alignment        pull = mean over classes and coordinates of (f(p_L) - f(p_P))^2
                     push = mean_c max(0, alpha - ||f(p_L)_c - f(p_G)_c||)
    loss             mean over the batch of the per-sample loss + pull + push

(weights 1 and 1, as the reference). The gradient reaches p_G through the SVD too, as the
reference, which does not detach it. The pull and push terms read no training record: they are
the scheme's prior, outside per-sample clipping and without noise (as FedPGP's contrastive
term); the two cross-entropies are the per-sample loss, clipped jointly over p_G and p_L.

Privacy: what crosses the wire is `global_local`'s: p_G alone (its clipped per-sample gradient
sums noised by the server under `server` trust, its noised trained value under `client`
trust), plus, under `server` trust, the gradient of the prior on p_G, which is a function of the
released p_G and of p_L (noised by its client) only. p_L is noised by its client under both.

What is not built: the paper's headline, local prompts of different lengths on different
clients (the reference's `GL_SVDMSE_HE`): fpl-bench's text tower has one n_ctx for every prompt
of a run (the clients' steps are stacked into one forward). With one length for all, as here,
the reference's `GL_SVDMSE` is what PMFLT runs (its config: N_CTX 16 for every client).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_bench.learners._base import EncodeContext, cosine_logits
from fpl_bench.schemes import SCHEMES
from fpl_bench.schemes.global_local import GlobalLocal


def minor_directions(p_global: Tensor, ratio: float) -> Tensor:
    """V_2 [W, n_ctx - k]: the right singular vectors of p_G [n_ctx, W] (thin SVD, singular
    values descending) after the first k = floor(n_ctx (1 - ratio))."""
    _, s, vh = torch.linalg.svd(p_global, full_matrices=False)
    cutoff = int(s.shape[-1] * (1 - ratio))  # the reference's truncation, float for float
    return vh[..., cutoff:, :].transpose(-1, -2)


def project(p_local: Tensor, p_global: Tensor, ratio: float) -> Tensor:
    """p_P = p_L V_2 V_2^T [n_ctx, W]."""
    v2 = minor_directions(p_global, ratio)
    return p_local @ v2 @ v2.transpose(-1, -2)


@SCHEMES.register("fedpha")
@dataclass(frozen=True)
class FedPHA(GlobalLocal):
    """`global_local`'s prompts; the local one scores, both train on the labels, and the
    SVD-projected local prompt and the global one align it (module docstring)."""

    ratio: float  # the fraction of p_G's singular directions kept for the projection
    alpha: float  # the push margin on ||f(p_L)_c - f(p_G)_c||
    pull: float  # weight of the pull term (reference 1)
    push: float  # weight of the push term (reference 1)

    n_extra_prompts: ClassVar[int] = 1  # p_P, for the pull term
    scores: ClassVar[bool] = True

    def prompts(self, step: Mapping[str, Tensor], aux: Mapping[str, Tensor]) -> Tensor:
        """[p_L, p_G]: the learner's first component is the one that scores."""
        return torch.stack([step["p_local"], step["p_global"]])  # [2, n_ctx, W]

    def extra_prompts(
        self, step: Mapping[str, Tensor], aux: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        return {"projected": project(step["p_local"], step["p_global"], self.ratio)}

    def logits(self, encoded: Mapping[str, Any], images: Tensor, logit_scale: float) -> Tensor:
        """s <x^, f(p_L)_c>."""
        return cosine_logits(encoded["text"][0], images, logit_scale)

    def sample_loss(
        self, encoded: Mapping[str, Any], image: Tensor, label: Tensor, logit_scale: float
    ) -> Tensor:
        """CE of the local prompt's logits + CE of the global prompt's."""
        text = encoded["text"]
        logits = torch.stack([cosine_logits(text[i], image, logit_scale) for i in range(2)])
        return F.cross_entropy(logits, label.expand(2), reduction="sum")

    def prior_loss(
        self,
        step: Mapping[str, Tensor],
        encoded: Mapping[str, Any],
        ctx: EncodeContext,
        anchor: Mapping[str, Tensor],
    ) -> Tensor:
        """pull MSE(f(p_L), f(p_P)) + push mean_c relu(alpha - ||f(p_L)_c - f(p_G)_c||)."""
        local, global_ = encoded["text"][0], encoded["text"][1]
        pull = (local - encoded["projected"]).pow(2).mean()
        push = F.relu(self.alpha - (local - global_).norm(dim=-1)).mean()
        return self.pull * pull + self.push * push
