"""PromptFolio (Pan, Huang, Shi, "Federated Learning from Vision-Language Foundation Models:
Theoretical Analysis and Method", NeurIPS 2024, arXiv:2409.19610; reference PanBikang/PromptFolio,
whose `trainers/` held only compiled bytecode where it was read; its `PromptFolioCLIP.forward`
is read from the copies in 0-ml/flip `flcore/models/clip/PromptFolio.py` and Yuqin-G/PMFLT
`clip/model_promptfolio.py`, which agree on all that follows).

A prompt portfolio: each client holds a global prompt p_G, averaged by the server (FedAvg,
weighted by sample count), and a local prompt p_L that never leaves it, as `global_local`.
The class text features the learner scores mix the two prompts' features with the portfolio
weight theta (0: fully global, 1: fully local):

    t_{G,c} = f(p_G, c) / ||f(p_G, c)||,   t_{L,c} = f(p_L, c) / ||f(p_L, c)||
    t_c     = (1 - theta) t_{G,c} + theta t_{L,c}          (not normalised again)
    logit_c = logit_scale * <x / ||x||, t_c>
            = (1 - theta) logit_c(p_G) + theta logit_c(p_L)

so the logits are the portfolio of the two prompts' CLIP logits, and both prompts train on the
client's loss through the mix, every local step. As the reference: the features are mixed, not
the prompts; each is L2-normalised before the mix and the mix is not (a renormalised mix would
no longer be the mix of the two logits); the two prompts are two N(0, 0.02^2) draws (or both
`ctx_init`). The reference's example command uses theta ("frac_p") 0.4, as does the card.

The mix runs inside the encoder function (`mix_text`), so DP's per-sample gradients of p_G and
p_L are exact through it and evaluation scores the same mix (tests/test_promptfolio.py). Under
DP, noise is placed as for `global_local`: p_G where the trust model says, p_L by its client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from fpl_bench.schemes import SCHEMES
from fpl_bench.schemes.global_local import GlobalLocal


@SCHEMES.register("promptfolio")
@dataclass(frozen=True)
class PromptFolio(GlobalLocal):
    """`global_local`'s prompts, scored through the theta-mix of their text features."""

    theta: float  # the portfolio weight of the local prompt

    mixes_text: ClassVar[bool] = True

    def mix_text(self, text: Tensor) -> Tensor:
        """Unit features [2, n, D] of (p_G, p_L) -> [1, n, D]: (1 - theta) t_G + theta t_L."""
        return ((1 - self.theta) * text[0] + self.theta * text[1]).unsqueeze(0)
