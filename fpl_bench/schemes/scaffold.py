"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020, arXiv:1910.06378), Algorithm 1 with option II, on FedAvg's one global
prompt x. Client i keeps a control variate c_i, the server keeps c (both start at zero):

    local step (line 10)    y_i <- y_i - lr (g_i(y_i) - c_i + c)
    round end (option II)   c_i+ = c_i - c + (x - y_i) / (K lr),   sends dc_i = c_i+ - c_i
    server (line 17)        x <- mean of the y_i (FedAvg's weighted mean, eta_g = 1)
                            c <- c + (1 / N) sum_{i in S} dc_i

K is the client's number of local steps in the round, lr the local learning rate and N the
number of clients. With client SGD momentum beta the local update is not K plain SGD steps: a
step moves lr g / (1 - beta) once the momentum has built up, so (x - y_i) / (K lr) estimates
g_i / (1 - beta), and the correction, itself then amplified by the momentum, would be 1 / (1 -
beta) times too large (10x at beta = 0.9: measured, the embedded default's base accuracy fell
from PromptFL's 75.5 to 51.6). Option II is therefore taken over the effective step size,
c_i+ = c_i - c + (1 - beta) (x - y_i) / (K lr): the paper's formula at beta = 0.

Privacy: the variates are built only from what DP already released. Under `client` trust each
y_i is the result of client-noised steps, and the correction c - c_i is added to a gradient
after its noise; under `server` trust the shared prompt is synchronised every step
(privacy/placement.py), so x and y_i are the server's noised values. Either way c_i and c are
post-processing of released values and cost no privacy budget (tests/test_scaffold.py runs it
at the same epsilon and noise as FedAvg). Under per-step synchronisation the server applies the
clients' averaged gradient, where the corrections of all clients would cancel (c is the mean
of the c_i when every client takes part), so none is applied there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fpl_bench.learners._base import Params
from fpl_bench.schemes import SCHEMES
from fpl_bench.schemes._base import RoundEnd
from fpl_bench.schemes.fedavg import FedAvg


def variate(name: str) -> str:
    """The state entry holding the control variate of parameter `name`."""
    return f"c.{name}"


@SCHEMES.register("scaffold")
@dataclass(frozen=True)
class Scaffold(FedAvg):
    """FedAvg corrected by client and server control variates (option II); no options."""

    def init_state(self, params: Mapping[str, Tensor]) -> tuple[Params, Params]:
        zeros = {variate(k): torch.zeros_like(params[k]) for k in self.shared}
        return zeros, {k: v.clone() for k, v in zeros.items()}

    def correct_grads(
        self, grads: Mapping[str, Tensor], state: Mapping[str, Tensor], server: Mapping[str, Tensor]
    ) -> Params:
        """g - c_i + c for each locally trained shared parameter (line 10)."""
        return {
            k: g - state[variate(k)] + server[variate(k)] if variate(k) in state else g
            for k, g in grads.items()
        }

    def client_round_end(
        self, done: RoundEnd, state: Mapping[str, Tensor], server: Mapping[str, Tensor]
    ) -> tuple[Params, Params]:
        """(c_i+, dc_i) by option II; unchanged for a client that took no step."""
        if done.steps == 0:
            return dict(state), {k: torch.zeros_like(v) for k, v in state.items()}
        scale = (1.0 - done.momentum) / (done.steps * done.lr)
        new = {
            variate(k): state[variate(k)]
            - server[variate(k)]
            + scale * (done.start[k] - done.end[k])
            for k in self.shared
        }
        return new, {k: new[k] - state[k] for k in new}

    def server_round_end(
        self, server: Mapping[str, Tensor], sent: Sequence[Mapping[str, Tensor]], n_clients: int
    ) -> Params:
        """c + (1 / N) sum_i dc_i over the round's clients (line 17)."""
        return {k: c + sum(d[k] for d in sent) / n_clients for k, c in server.items()}
