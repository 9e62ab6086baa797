"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020,
arXiv:1812.06127): FedAvg with a proximal term in each client's local objective (Eq. 2),

    h_i(theta) = F_i(theta) + (mu / 2) || theta - theta_global ||^2,

theta_global being the server's value when the round starts. The term touches no training
record: it is a prior (outside per-sample clipping, no noise, not rescaled by the batch size).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from fpl_bench.learners._base import EncodeContext, Params
from fpl_bench.schemes import SCHEMES
from fpl_bench.schemes.fedavg import FedAvg


@SCHEMES.register("fedprox")
@dataclass(frozen=True)
class FedProx(FedAvg):
    """FedAvg plus (mu / 2) ||theta - theta_global||^2 on the shared prompt."""

    mu: float  # proximal weight

    def round_start(self, params: Mapping[str, Tensor], server: Mapping[str, Tensor]) -> Params:
        return {k: server[k].detach().clone() for k in self.shared}

    def prior_loss(
        self,
        step: Mapping[str, Tensor],
        encoded: Mapping[str, Any],
        ctx: EncodeContext,
        anchor: Mapping[str, Tensor],
    ) -> Tensor | None:
        if not anchor:
            return None
        return 0.5 * self.mu * sum((step[k] - anchor[k]).pow(2).sum() for k in anchor)
