"""FedPGP's federation (Cui et al., "Harmonizing Generalization and Personalization in
Federated Prompt Learning", ICML 2024, arXiv:2405.09771; reference TianyuCuiOvO/FedPGP
`trainers/fedpgp.py`).

Client i's prompt is a global part plus a low-rank personal part:

    p_i = sigma + U_i V_i,   sigma [n_ctx, W] global (FedAvg),  U_i [n_ctx, b], V_i [b, W] local

with a prompt-wise contrastive prior that keeps the global prompt near CLIP's own knowledge and
apart from the personalized one:

    pos = cos(f_init, f_sigma),  neg = cos(f_sigma, f_full)       (per class)
    L_con = mean_c CE([pos_c, neg_c] / temp, target 0);   local loss = CE + mu * L_con

f_init is the frozen feature of the placeholder prompt "X X ... X {class}."; it is a constant,
computed once (the reference recomputes it every batch). f_sigma and f_full come from the same
tower forward as the logits (sigma is an extra prompt). L_con reads no training image, so it is
a prior: applied outside per-sample clipping, with no noise (the reference mixes it into the
batch loss; without DP the gradient is the same).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_bench.learners._base import EncodeContext, InitContext, Params, PromptLearner
from fpl_bench.schemes import SCHEMES
from fpl_bench.schemes._base import Scheme, check_rank
from fpl_bench.text_tower import PLACEHOLDER


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


@SCHEMES.register("sigma_uv")
@dataclass(frozen=True)
class SigmaUV(Scheme):
    """Global sigma + local low-rank U V, with a prompt-wise contrastive prior."""

    rank: int  # b in the paper
    mu: float  # weight of the contrastive loss
    temperature: float

    shared: ClassVar[tuple[str, ...]] = ("sigma",)
    n_extra_prompts: ClassVar[int] = 1  # sigma alone, for the contrastive prior

    def check(self, init: InitContext) -> None:
        check_rank(self.rank, init, "rank")

    def init_params(self, init: InitContext, learner: PromptLearner) -> Params:
        tower, gen = init.tower, init.generator
        return {
            "sigma": learner.init_prompt(init),  # [n_ctx, W]
            "U": 0.02 * torch.randn(tower.n_ctx, self.rank, generator=gen),  # [n_ctx, b]
            "V": 0.02 * torch.randn(self.rank, tower.width, generator=gen),  # [b, W]
        }

    def constants(self, init: InitContext) -> Params:
        tower = init.tower
        placeholder = tower.embed_phrase(" ".join([PLACEHOLDER] * tower.n_ctx))
        with torch.no_grad():
            return {"sigma_uv_f_init": tower.encode(placeholder)}  # [n_cls, D]

    def prompts(self, step: Mapping[str, Tensor], aux: Mapping[str, Tensor]) -> Tensor:
        return (step["sigma"] + step["U"] @ step["V"]).unsqueeze(0)  # [1, n_ctx, W]

    def extra_prompts(
        self, step: Mapping[str, Tensor], aux: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        return {"sigma": step["sigma"]}

    def prior_loss(
        self,
        step: Mapping[str, Tensor],
        encoded: Mapping[str, Any],
        ctx: EncodeContext,
        anchor: Mapping[str, Tensor],
    ) -> Tensor | None:
        f_init = ctx.consts["sigma_uv_f_init"][ctx.class_idx]
        con = contrastive_loss(
            f_init, encoded["sigma"], encoded["text"][0], temperature=self.temperature
        )
        return self.mu * con
