"""ProDA (Lu, Liu, Zhang, Liu, Tian, "Prompt Distribution Learning", CVPR 2022,
arXiv:2205.03340; federated in 0-ml/flip `flcore/models/clip/ProDA.py` with its
`ProDAPromptLearner` in `flcore/models/text/prompt.py`).

K learnable prompts P_1..P_K (CoOp's context each) give class c the normalised text features
t_{c,1..K}; they are read as draws of a Gaussian over the classifier weights w_c (Sec. 3.2),
mean and covariance estimated from the K features:

    mu_c = (1 / K) sum_k t_{c,k},     e_{c,k} = t_{c,k} - mu_c
    Sigma_ij[d] = (1 / (K + 1)) sum_k e_{i,k,d} e_{j,k,d}      (one D-diagonal per class pair)

The logits z_c = s x . w_c (s = logit_scale, x the normalised image feature) are then Gaussian
with mean s x . mu_c and covariance A_ij = s^2 sum_d x_d^2 Sigma_ij[d]. The expected
cross-entropy E_w[-log softmax(z)_y] has no closed form; the paper minimises its upper bound
(Jensen on log E, then the Gaussian moment generating function, Sec. 3.3):

    L(x, y) = -log  exp(s x . mu_y) / sum_c exp(s x . mu_c + 1/2 (A_cc + A_yy - 2 A_cy))
            = CE(z~, y),  z~_c = s x . mu_c + (s^2 / 2) (1 / (K + 1)) sum_k ||x * (e_{y,k} - e_{c,k})||^2

(the second form is the first with Sigma written out: A_cc + A_yy - 2 A_cy is the variance of
z_c - z_y). Prediction scores the mean: logit_c = s x . mu_c (mu_c not renormalised, as the
reference's `set_classifier`).

The reference adds a diversity term on the prompts without a class name ("X X X X."): with u_k
the normalised feature of P_k alone, lambda * mean_{k != l} |cos(u_k, u_l)| (its `add_loss`,
lambda = `ortho_loss_ratio` = 1). It reads no training record: it is this learner's
`prior_loss`, outside per-sample clipping and without noise.

Layout (as PLOT's, fpl_bench/learners/plot.py): prompt 1 is the scheme's, prompts 2..K the
learner's own (`proda.prompts` [K - 1, n_ctx, W]); `encode` runs all K over the scored classes
and the K class-free sequences in one tower forward. Under DP the per-sample loss reads the
shared text features and its own image only, so its gradient (of every prompt) is exact from
the one vjp (privacy/per_sample.py).

Departures from the reference:
- all K prompts every step (the reference may train a random `prompt_batch_size` subset per
  iteration; with its default, the batch is all K);
- every prompt puts the class name at the end (the paper also places it in the middle and at
  the front for a quarter of the prompts each; FLiP's `construct_prompts` keeps the end only);
- the covariance divisor K + 1 is the reference's (the paper writes the sample covariance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_bench.learners import LEARNERS
from fpl_bench.learners._base import EncodeContext, InitContext, Params, PromptLearner
from fpl_bench.text_tower import TextTower

PROMPTS = "proda.prompts"  # the learner's own prompts 2..K [K - 1, n_ctx, W]
PROMPT_STD = 0.02  # the reference's nn.init.normal_(ctx_vectors, std=0.02)


FREE = "proda_free"  # [S, W] embeddings of "SOS X .. X . EOT" (the context slots overwritten)


def free_embedding(tower: TextTower) -> Tensor:
    """Token embeddings [n_ctx + 3, W] of "SOS X .. X . EOT", the class-free sequence."""
    tokens = tower.tokenizer([" ".join(["X"] * tower.n_ctx) + "."])[0].to(tower.positional.device)
    with torch.no_grad():
        return tower.token_embedding(tokens[: int(tokens.argmax()) + 1]).clone()


def class_free_features(tower: TextTower, prompts: Tensor, embedded: Tensor) -> Tensor:
    """Normalised features [K, D] of "SOS P_k . EOT" for prompts [K, n_ctx, W] (the
    reference's `only_prefix`: the context followed by a full stop, no class name); embedded:
    `free_embedding(tower)`."""
    k, n_ctx = prompts.shape[0], prompts.shape[1]
    embedded = embedded.to(prompts.dtype)
    x = torch.cat(
        [embedded[:1].expand(k, 1, -1), prompts, embedded[1 + n_ctx :].expand(k, -1, -1)], dim=1
    )
    eot = torch.full((k,), x.shape[1] - 1, device=prompts.device)
    with tower.autocast(prompts.device):
        features = tower._run(x, eot)
    return F.normalize(features.to(prompts.dtype), dim=-1)


def proda_logits(text: Tensor, image: Tensor, label: Tensor, logit_scale: float) -> Tensor:
    """The surrogate logits z~ [n] of one image [D] with label position `label`, from the K
    prompts' class features text [K, n, D] (module docstring)."""
    k = text.shape[0]
    x = F.normalize(image, dim=-1)
    mean = text.mean(0)  # [n, D]
    dev = (text - mean) * x  # [K, n, D]: x_d e_{c,k,d}
    diff = dev - dev.index_select(1, label.reshape(1))  # x * (e_{c,k} - e_{y,k})
    var = diff.pow(2).sum((0, 2)) / (k + 1)  # [n]: sum_d x_d^2 (Sigma_cc + Sigma_yy - 2 Sigma_cy)
    return logit_scale * (mean @ x) + 0.5 * logit_scale**2 * var


def diversity(free: Tensor) -> Tensor:
    """mean_{k != l} |cos(u_k, u_l)| of normalised class-free features free [K, D]; 0 for K = 1."""
    k = free.shape[0]
    if k < 2:
        return free.sum() * 0.0
    cos = free @ free.T
    off = ~torch.eye(k, dtype=torch.bool, device=free.device)
    return cos[off].abs().mean()


@LEARNERS.register("proda")
@dataclass(frozen=True)
class ProDA(PromptLearner):
    """K prompts whose class features define a Gaussian per class; trained on the paper's
    upper bound of the expected cross-entropy."""

    n_prompts: int  # K
    lam: float  # weight of the reference's diversity term (its ortho_loss_ratio)

    own_params: ClassVar[tuple[str, ...]] = (PROMPTS,)
    adds_prompts: ClassVar[bool] = True

    def relative_cost(self) -> float:
        """K prompts through the text tower (its backward under DP) instead of one."""
        return float(self.n_prompts)

    def init_params(self, init: InitContext) -> Params:
        tower = init.tower
        shape = (self.n_prompts - 1, tower.n_ctx, tower.width)
        return {PROMPTS: PROMPT_STD * torch.randn(shape, generator=init.generator)}

    def constants(self, init: InitContext) -> Params:
        return {FREE: free_embedding(init.tower)} if self.lam else {}

    def encode(self, prompts: Tensor, ctx: EncodeContext) -> dict[str, Tensor]:  # type: ignore[override]
        """{"classes": [K, n, D] the class features of the scheme's prompts [S, n_ctx, W]
        followed by the learner's own, "free": [K, D] the class-free features (only with a
        diversity weight)}."""
        every = torch.cat([prompts, ctx.own[PROMPTS].to(prompts.dtype)])
        out = {"classes": ctx.tower.encode(every, ctx.class_idx)}
        if self.lam:
            out["free"] = class_free_features(ctx.tower, every, ctx.consts[FREE])
        return out

    def logits(  # type: ignore[override]
        self,
        text: dict[str, Tensor],
        images: Tensor,
        tokens: Tensor | None,
        ctx: EncodeContext,
        given: Tensor | None = None,
    ) -> Tensor:
        """Prediction logits s x . mu_c [B, n] (or [n]) of the mean class features."""
        mean = text["classes"].mean(0)
        return ctx.tower.logit_scale * F.normalize(images, dim=-1) @ mean.T

    def sample_loss(  # type: ignore[override]
        self,
        text: dict[str, Tensor],
        image: Tensor,
        tokens: Tensor,
        label: Tensor,
        ctx: EncodeContext,
        given: Tensor | None = None,
    ) -> Tensor:
        """CE of the surrogate logits z~ of one sample (the paper's upper bound)."""
        z = proda_logits(text["classes"], image, label, ctx.tower.logit_scale)
        return F.cross_entropy(z.unsqueeze(0), label.unsqueeze(0))

    def prior_loss(self, text: dict[str, Tensor], ctx: EncodeContext) -> Tensor | None:  # type: ignore[override]
        """lambda * mean_{k != l} |cos(u_k, u_l)| (data-independent), or None for lambda = 0."""
        if not self.lam:
            return None
        return self.lam * diversity(text["free"])
