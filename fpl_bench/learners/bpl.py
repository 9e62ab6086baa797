"""BPL (Derakhshani, Sanchez, Bulat, da Costa, Snoek, Tzimiropoulos, Martinez, "Bayesian Prompt
Learning for Image-Language Model Generalization", ICCV 2023, arXiv:2210.02390; reference
saic-fi/Bayesian-Prompt-Learning `trainers/vpt.py`; federated in 0-ml/flip
`flcore/models/clip/BPLCLIP.py` with its `BPLPromptLearner` in `flcore/models/text/prompt.py`).

CoOp's context v_1..v_M plus a residual r, drawn per image from an amortised Gaussian posterior
q(r | x) = N(mu(x), diag sigma^2(x)) and added to every context vector (the image-conditioned
form, the reference's `cocoopvpt`):

    [mu(x), log sigma^2(x)] = two meta-nets  Linear(D, h) -> ELU -> Linear(h, h) -> ELU -> Linear(h, W)
    r_l = mu(x) + sigma(x) * eps_l,  eps_l ~ N(0, I_W),  l = 1..L          (reparameterisation)
    p(y | x, r_l) = softmax_y(s cos(g(t_y(v + r_l)), f(x)))
    L(x, y) = -log (1 / L) sum_l p(y | x, r_l)  +  beta KL(q(r | x) || N(0, I))
    KL = (1 / W) sum_w 1/2 (sigma_w^2 + mu_w^2 - 1 - log sigma_w^2)

x is the normalised image feature, h = D // reduction (the reference: D // 2), beta = 0.001 (the
reference's training loss), the KL averaged over the W dimensions as the reference's `.mean(-1)`.
Prediction averages the L predictive distributions: log (1 / L) sum_l p(y | x, r_l). Each image
has its own prompts, so (as CoCoOp) the text tower runs L x n_cls sequences per image inside the
per-sample loss.

Random draws and reproducibility. eps is a counter-based hash, not a stateful generator: the
step's key (`draws`, three 21-bit integers from the step's seeded stream: run seed, round,
client, step; an evaluation has its own) and the bits of the image feature (as float32) are
hashed into a 32-bit seed per record (`record_seed`), and eps_{l,w} is the Box-Muller transform
of two hashed counters (`standard_normal`). The same run seed gives the same draws on every
machine, whatever the batch, its order, the chunking of evaluation or vmap.

Under DP. Each sample's loss reads the shared context and meta-net, its own image, label and
the step key, nothing of any other sample (its eps depends on its record, not its position in
the batch, so adding or removing a record changes no other record's draw): its gradient is
exact from the vmapped tower, and clipping bounds its contribution to C, for any key, known or
not. The KL term is data-dependent (mu and sigma are functions of the image), so it is part of
the per-sample loss and clipped with the likelihood term; it is not a prior.

Departures from the reference: the batch is the run's (the reference trains with batch 1, its
loss the same per-sample sum); the hash replaces torch.randn (reproducible per record); the
context starts as the run's (the reference's config: 4 tokens from "a photo of a").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_bench.learners import LEARNERS
from fpl_bench.learners._base import (
    EVAL_CHUNK,
    PER_IMAGE_COST,
    EncodeContext,
    InitContext,
    Params,
    PromptLearner,
    linear_init,
)

KEY = "bpl.key"  # [3] the step's key: three 21-bit integers, as float32 (exact)
HEADS = ("mean", "logvar")
LAYERS = ("w1", "b1", "w2", "b2", "w3", "b3")
META = tuple(f"bpl.{head}.{part}" for head in HEADS for part in LAYERS)
EVAL_ROWS = 2**13  # token rows per evaluation forward (as CoCoOp's)
MASK32 = 0xFFFFFFFF


def _mul32(h: Tensor, c: int) -> Tensor:
    """(h * c) mod 2^32 for h in [0, 2^32) held in int64, without leaving the int64 range."""
    lo, hi = h & 0xFFFF, h >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & MASK32


def mix32(h: Tensor) -> Tensor:
    """A 32-bit integer hash (xorshift-multiply, "lowbias32") of h in [0, 2^32), elementwise."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _mul32(h, 0x846CA68B)
    return h ^ (h >> 16)


def record_seed(key: Tensor, image: Tensor) -> Tensor:
    """A 32-bit seed [...] (int64) of one record under a step's key [3]: the key's parts and the
    float32 bits of the image feature image [..., D], each bit pattern hashed with its index."""
    bits = image.float().view(torch.int32).to(torch.int64) & MASK32  # [..., D]
    index = torch.arange(bits.shape[-1], device=bits.device, dtype=torch.int64)
    total = mix32(bits ^ mix32(index + 1)).sum(-1)  # < D 2^32
    h = mix32((total & MASK32) ^ mix32(total >> 32))
    k = key.to(device=bits.device, dtype=torch.int64)
    return mix32(h ^ mix32(k[0] ^ mix32(k[1] ^ mix32(k[2]))))


def standard_normal(seed: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """N(0, 1) draws [..., *shape] from seeds [...]: counter j hashed with the seed gives a
    uniform u_j in (0, 1); eps = sqrt(-2 log u_j) cos(2 pi u_{n + j}) (Box-Muller), in float64."""
    n = math.prod(shape)
    counter = torch.arange(2 * n, device=seed.device, dtype=torch.int64)
    u = mix32(mix32(seed.unsqueeze(-1) ^ mix32(counter + 1)) ^ counter)
    uniform = ((u >> 8).to(torch.float64) + 0.5) / 2.0**24  # (0, 1)
    radius = torch.sqrt(-2.0 * torch.log(uniform[..., :n]))
    eps = radius * torch.cos(2.0 * math.pi * uniform[..., n:])
    return eps.to(dtype).reshape(*seed.shape, *shape)


def posterior(own: Mapping[str, Tensor], images: Tensor) -> tuple[Tensor, Tensor]:
    """(mu, log sigma^2) [..., W] of normalised image features [..., D]: two meta-nets."""
    x = F.normalize(images, dim=-1)
    out = []
    for head in HEADS:
        p = {part: own[f"bpl.{head}.{part}"] for part in LAYERS}
        hidden = F.elu(F.linear(x, p["w1"], p["b1"]))
        hidden = F.elu(F.linear(hidden, p["w2"], p["b2"]))
        out.append(F.linear(hidden, p["w3"], p["b3"]))
    return out[0], out[1]


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """(1 / W) sum_w KL(N(mu_w, sigma_w^2) || N(0, 1)) over the last dim."""
    return 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar).mean(-1)


@LEARNERS.register("bpl")
@dataclass(frozen=True)
class BPL(PromptLearner):
    """Context vectors shifted per image by a residual sampled from an amortised posterior."""

    samples: int  # L, Monte Carlo draws of the residual per image
    kl_weight: float  # beta
    reduction: int  # the meta-nets' hidden width is D // reduction (the reference: 2)

    own_params: ClassVar[tuple[str, ...]] = META

    def relative_cost(self) -> float:
        """CoCoOp's tower per image and class, once per draw: the L draws cost L CoCoOps."""
        return PER_IMAGE_COST * self.samples

    reads_images: ClassVar[bool] = True

    def init_params(self, init: InitContext) -> Params:
        tower = init.tower
        dim = tower.feature_dim
        hidden = max(1, dim // self.reduction)
        out: Params = {}
        for head in HEADS:
            w1, b1 = linear_init(dim, hidden, init.generator)
            w2, b2 = linear_init(hidden, hidden, init.generator)
            w3, b3 = linear_init(hidden, tower.width, init.generator)
            values = (w1, b1, w2, b2, w3, b3)
            out.update({f"bpl.{head}.{p}": v for p, v in zip(LAYERS, values, strict=True)})
        return out

    def draws(self, generator: torch.Generator) -> Params:
        """The step's key: three 21-bit integers (exact in float32, so it rides the vjp)."""
        return {KEY: torch.randint(0, 2**21, (3,), generator=generator).to(torch.float32)}

    def encode(self, prompts: Tensor, ctx: EncodeContext) -> Tensor:
        """No tower forward here: the context [N, n_ctx, W] (the prompts depend on the image)."""
        return prompts

    def residuals(self, images: Tensor, ctx: EncodeContext) -> tuple[Tensor, Tensor, Tensor]:
        """(r [..., L, W], mu, log sigma^2 [..., W]) of image features [..., D]."""
        if KEY not in ctx.draws:
            raise ValueError("bpl reads the step's draws: encode with Method.step_params' aux")
        mu, logvar = posterior(ctx.own, images)
        seed = record_seed(ctx.draws[KEY], images)
        eps = standard_normal(seed, (self.samples, mu.shape[-1]), mu.dtype)  # [..., L, W]
        return mu.unsqueeze(-2) + eps * (0.5 * logvar).exp().unsqueeze(-2), mu, logvar

    def log_probs(self, text: Tensor, images: Tensor, ctx: EncodeContext) -> tuple[Tensor, ...]:
        """(log p(. | x, r_l) [..., L, n], mu, log sigma^2) of images [..., D], text = the
        context [1, n_ctx, W]."""
        r, mu, logvar = self.residuals(images, ctx)
        prompts = text[0] + r.unsqueeze(-2)  # [..., L, n_ctx, W]
        features = ctx.tower.encode(prompts, ctx.class_idx)  # [..., L, n, D]
        x = F.normalize(images, dim=-1).unsqueeze(-2).unsqueeze(-2)  # [..., 1, 1, D]
        logits = ctx.tower.logit_scale * (features * x).sum(-1)
        return F.log_softmax(logits, dim=-1), mu, logvar

    def logits(
        self,
        text: Tensor,
        images: Tensor,
        tokens: Tensor | None,
        ctx: EncodeContext,
        given: Tensor | None = None,
    ) -> Tensor:
        """log (1 / L) sum_l p(. | x, r_l) [B, n] (or [n]): the averaged prediction."""
        log_p, _, _ = self.log_probs(text, images, ctx)
        return torch.logsumexp(log_p, dim=-2) - math.log(self.samples)

    def sample_loss(
        self,
        text: Tensor,
        image: Tensor,
        tokens: Tensor,
        label: Tensor,
        ctx: EncodeContext,
        given: Tensor | None = None,
    ) -> Tensor:
        """-log (1 / L) sum_l p(y | x, r_l) + beta KL(q(r | x) || N(0, I)) of one sample."""
        log_p, mu, logvar = self.log_probs(text, image, ctx)  # [L, n]
        picked = log_p.index_select(-1, label.reshape(1))[..., 0]  # [L]
        nll = math.log(self.samples) - torch.logsumexp(picked, dim=-1)
        return nll + self.kl_weight * gaussian_kl(mu, logvar)

    def eval_chunk(self, text: Tensor, tokens: Tensor | None, ctx: EncodeContext) -> int:
        """Images per chunk: L tower passes of `tower.rows(n)` rows each; about EVAL_ROWS rows."""
        rows = self.samples * ctx.tower.rows(len(ctx.class_idx))
        return max(1, min(EVAL_CHUNK, EVAL_ROWS // rows))
