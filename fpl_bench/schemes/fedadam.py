"""FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, arXiv:2003.00295),
Algorithm 2 with the Adam server update, on FedAvg's one global prompt x. The clients train as
in FedAvg; the server treats the change of the aggregate as a pseudo-gradient:

    Delta_t = sum_i n_i y_i / sum_i n_i - x_t        (FedAvg's weighted mean of the y_i)
    m_t     = beta1 m_{t-1} + (1 - beta1) Delta_t
    v_t     = beta2 v_{t-1} + (1 - beta2) Delta_t^2
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)

with m_0 = 0 and v_0 = 0 (the paper's v_{-1} >= tau^2 is a choice it allows; zero makes the
first step eta Delta / (|Delta| + tau) per coordinate) and no bias correction, as the paper's
algorithm. The paper weighs Delta_i equally; this follows FedAvg's weighting by sample count,
as every fpl-bench scheme does. m and v are server state: not trained, never noised, and under
DP they are post-processing of the released aggregate. Under per-step synchronisation (DP with
a trusted server) the server applies the run's SGD to the noised gradient each step, and this
round-level optimizer has nothing to act on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fpl_bench.learners._base import Params
from fpl_bench.schemes import SCHEMES
from fpl_bench.schemes.fedavg import FedAvg


@SCHEMES.register("fedadam")
@dataclass(frozen=True)
class FedAdam(FedAvg):
    """FedAvg's clients, Adam on the server's pseudo-gradient."""

    server_lr: float  # eta
    beta1: float
    beta2: float
    tau: float  # the adaptivity floor

    def server_update(
        self,
        params: Mapping[str, Tensor],
        mean: Mapping[str, Tensor],
        state: Mapping[str, Tensor],
    ) -> tuple[Params, Params]:
        new, moments = dict(params), dict(state)
        for k, agg in mean.items():
            delta = agg - params[k]
            m = self.beta1 * state.get(f"m.{k}", torch.zeros_like(delta)) + (1 - self.beta1) * delta
            v = self.second_moment(state.get(f"v.{k}", torch.zeros_like(delta)), delta)
            new[k] = params[k] + self.server_lr * m / (v.sqrt() + self.tau)
            moments[f"m.{k}"], moments[f"v.{k}"] = m, v
        return new, moments

    def second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        """Adam's v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2, elementwise."""
        return self.beta2 * v + (1 - self.beta2) * delta.pow(2)
