"""Centralised training: all clients' training data pooled in one place and one prompt trained
on it, with no federation (the upper bound FLiP reports as "Central"; 0-ml/flip).

The driver builds one trainer holding the union of the clients' training examples
(`driver.training_groups`) and evaluates every client with the pooled prompt, so its local and
neighbor accuracies are on the same test images as every federated method's. Under DP the
pooled trainer runs DP-SGD on the union: Poisson sampling at rate B / (sum_i n_i), its own
noise, one record of the pooled data as the privacy unit (what a trusted curator could do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fpl_bench.schemes import SCHEMES
from fpl_bench.schemes._base import OnePrompt


@SCHEMES.register("central")
@dataclass(frozen=True)
class Central(OnePrompt):
    """One prompt trained on the pooled data of every client; no options."""

    pools_clients: ClassVar[bool] = True
