"""FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, arXiv:2003.00295),
Algorithm 2 with the Yogi server update, on FedAvg's one global prompt x. Everything but the
second moment is FedAdam's (fpl_bench/schemes/fedadam.py):

    Delta_t = sum_i n_i y_i / sum_i n_i - x_t
    m_t     = beta1 m_{t-1} + (1 - beta1) Delta_t
    v_t     = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)     (Yogi)
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)

Where Adam moves v towards Delta^2 by a fraction (1 - beta2) of their gap, Yogi moves it by
(1 - beta2) Delta^2 in the gap's direction, so v grows or shrinks additively and v >= 0 is
kept: from v >= 0, a step down only happens while v > Delta^2, and it removes
(1 - beta2) Delta^2 < v. With FedAdam's m_0 = v_0 = 0 the first round equals FedAdam's
(sign(0 - Delta^2) = -1 gives v_1 = (1 - beta2) Delta_1^2); the rounds after differ. No bias
correction, weighting by sample count, and the moments as server state that DP never sees
(post-processing of the released aggregate): as FedAdam (tests/test_fedyogi.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fpl_bench.schemes import SCHEMES
from fpl_bench.schemes.fedadam import FedAdam


@SCHEMES.register("fedyogi")
@dataclass(frozen=True)
class FedYogi(FedAdam):
    """FedAdam with Yogi's additive second-moment update."""

    def second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        """Yogi's v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2), elementwise."""
        square = delta.pow(2)
        return v - (1 - self.beta2) * square * (v - square).sign()
