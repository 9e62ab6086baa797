"""Local training only: each client learns its own prompt on its own data and never
communicates (CoOp as a federated baseline, Zhou et al. IJCV 2022: the personalization-only
row). Under DP the prompt gets DP-SGD noise on the client (it is released as the client's
personalized prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fpl_bench.schemes import SCHEMES
from fpl_bench.schemes._base import OnePrompt


@SCHEMES.register("local")
@dataclass(frozen=True)
class Local(OnePrompt):
    """One prompt per client, never shared; no options."""

    federates: ClassVar[bool] = False
