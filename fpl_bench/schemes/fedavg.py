"""FedAvg of one global prompt (McMahan et al., AISTATS 2017, arXiv:1602.05629), which is
PromptFL (Guo et al., "PromptFL: Let Federated Participants Cooperatively Learn Prompts Instead
of Models", IEEE TMC 2023, arXiv:2208.11625) with the CoOp learner.

Each round the sampled clients start from the server's prompt, train it locally, and the server
takes the average weighted by client sample count. Unlike PromptFL's official repository, which
averaged aliased state dicts (the "average" equalled the last client), `weighted_mean` builds
new tensors (tests/methods/test_aggregate.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fpl_bench.schemes import SCHEMES
from fpl_bench.schemes._base import OnePrompt


@SCHEMES.register("fedavg")
@dataclass(frozen=True)
class FedAvg(OnePrompt):
    """One global prompt trained by FedAvg; no options."""

    shared: ClassVar[tuple[str, ...]] = ("prompt",)
