"""PromptFL (Guo et al., "PromptFL: Let Federated Participants Cooperatively Learn Prompts
Instead of Models", IEEE TMC 2023, arXiv:2208.11625).

One global prompt p [n_ctx, W]. Each round the sampled clients start from the server's p, train
it locally, and the server takes the average weighted by client sample count (FedAvg). Unlike
the official repository, which averaged aliased state dicts (the "average" equalled the last
client), `weighted_mean` builds new tensors: `tests/methods/test_aggregate.py` shows it.
Under DP each client runs DP-SGD on p before uploading it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from fpl_bench.methods.base import InitContext, Params, Placement, PromptMethod, random_context
from fpl_bench.methods.registry import register_method


@register_method("promptfl")
@dataclass(frozen=True)
class PromptFL(PromptMethod):
    """One global prompt trained by FedAvg."""

    shared: ClassVar[tuple[str, ...]] = ("prompt",)
    privacy: ClassVar[Placement] = Placement(client=("prompt",))

    def init_params(self, ctx: InitContext) -> Params:
        return {"prompt": random_context(ctx)}  # [n_ctx, W]

    def prompt_of(self, step: Mapping[str, Tensor], aux: Mapping[str, Tensor]) -> Tensor:
        return step["prompt"]
