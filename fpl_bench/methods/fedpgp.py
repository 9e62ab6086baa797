"""FedPGP (Cui et al., "Harmonizing Generalization and Personalization in Federated Prompt
Learning", ICML 2024, arXiv:2405.09771; reference TianyuCuiOvO/FedPGP `trainers/fedpgp.py`).

Client i's prompt is a global part plus a low-rank personal part:

    p_i = sigma + U_i V_i,   sigma [n_ctx, W] global (FedAvg),  U_i [n_ctx, b], V_i [b, W] local

Loss of one sample: CE(logits of p_i) + mu * L_con, where the prompt-wise contrastive term keeps
the global prompt near CLIP's own knowledge and apart from the personalized one:

    pos = cos(f_init, f_sigma),  neg = cos(f_sigma, f_full)       (per class)
    L_con = mean_c CE([pos_c, neg_c] / temp, target 0)

f_init is the frozen feature of the placeholder prompt "X X ... X {class}."; it is a constant,
computed once (the reference recomputes it every batch). f_sigma and f_full come from one tower
forward over the two prompts. Under DP, sigma, U and V get client-side DP-SGD noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_bench.errors import UsageError
from fpl_bench.methods.base import (
    EncodeContext,
    InitContext,
    Params,
    Placement,
    PromptMethod,
    check_rank,
    cosine_logits,
    random_context,
)
from fpl_bench.methods.registry import register_method
from fpl_bench.prompt import PLACEHOLDER


def contrastive_loss(
    f_init: Tensor, f_sigma: Tensor, f_full: Tensor, *, temperature: float
) -> Tensor:
    """FedPGP's prompt-wise contrastive loss over classes (features [n, D], L2-normalised).

    logits_c = [cos(f_init_c, f_sigma_c), cos(f_sigma_c, f_full_c)] / temperature; CE to 0.
    """
    pos = (f_init * f_sigma).sum(-1)
    neg = (f_sigma * f_full).sum(-1)
    logits = torch.stack([pos, neg], dim=-1) / temperature  # [n, 2]
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


@register_method("fedpgp")
@dataclass(frozen=True)
class FedPGP(PromptMethod):
    """Global sigma + local low-rank U V, with a prompt-wise contrastive loss."""

    rank: int = 8  # b in the paper
    mu: float = 1.0  # weight of the contrastive loss
    temperature: float = 0.5

    shared: ClassVar[tuple[str, ...]] = ("sigma",)
    privacy: ClassVar[Placement] = Placement(client=("sigma", "U", "V"))

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise UsageError(f"fedpgp rank {self.rank}: must be >= 1")
        if self.temperature <= 0:
            raise UsageError(f"fedpgp temperature {self.temperature}: must be > 0")

    def init_params(self, ctx: InitContext) -> Params:
        tower = ctx.tower
        check_rank(self.rank, tower)
        gen = ctx.generator
        return {
            "sigma": random_context(ctx),  # [n_ctx, W]
            "U": 0.02 * torch.randn(tower.n_ctx, self.rank, generator=gen),  # [n_ctx, b]
            "V": 0.02 * torch.randn(self.rank, tower.width, generator=gen),  # [b, W]
        }

    def constants(self, ctx: InitContext) -> Params:
        tower = ctx.tower
        placeholder = tower.embed_phrase(" ".join([PLACEHOLDER] * tower.n_ctx))
        with torch.no_grad():
            return {"f_init": tower.encode(placeholder)}  # [n_cls, D]

    def encode(
        self, step: Mapping[str, Tensor], aux: Mapping[str, Tensor], ctx: EncodeContext
    ) -> Any:
        sigma = step["sigma"]
        prompts = torch.stack([sigma, sigma + step["U"] @ step["V"]])  # [2, n_ctx, W]
        f_sigma, f_full = ctx.tower.encode(prompts, ctx.class_idx).unbind(0)  # [n, D] each
        return {"sigma": f_sigma, "full": f_full, "init": ctx.consts["f_init"][ctx.class_idx]}

    def logits(
        self, encoded: Any, images: Tensor, tokens: Tensor | None, ctx: EncodeContext
    ) -> Tensor:
        return cosine_logits(encoded["full"], images, ctx.tower.logit_scale)

    def sample_loss(
        self, encoded: Any, image: Tensor, tokens: Tensor, label: Tensor, ctx: EncodeContext
    ) -> Tensor:
        ce = super().sample_loss(encoded, image, tokens, label, ctx)
        con = contrastive_loss(
            encoded["init"], encoded["sigma"], encoded["full"], temperature=self.temperature
        )
        return ce + self.mu * con
