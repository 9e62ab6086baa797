"""What a federated prompt-learning method is, as the driver sees it.

A method is one frozen dataclass in `fpl_bench/methods/<name>.py`, registered with
`@register_method`. Its fields are the hyperparameters of its card (`methods/<name>.toml`); its
class variables declare what the driver must do with it:

    shared    parameter names the server aggregates (weighted by client sample count); the rest
              of a client's parameters never leave it
    sync      "round": clients train their copy for the round's local steps, then upload
              `shared` (FedAvg); "step": every local step the clients send the gradient of the
              shared parameters and the server applies their average (DP-FPL)
    privacy   where DP noise goes: `Placement(server=..., client=...)` names the step
              parameters (see `step_params`) whose per-sample gradients are clipped jointly;
              server ones are noised by the server on the sum of the clients' clipped sums,
              client ones by the client before anything leaves it

One local step of client i, in call order (the driver does it; a method never calls backward,
clips, draws noise, builds an optimizer or picks a device):

    step, aux = method.step_params(params_i, generator)  # what gradients are taken against
    Z = method.encode(step, aux, ctx)                   # text side, one tower forward
    l_j = method.sample_loss(Z, image_j, tokens_j, y_j)  # per sample, vmapped by privacy/
    g = (privatized) gradients of mean_j l_j w.r.t. `step`
    grads = method.param_grads(params_i, step, g)        # back to the stored parameters
    params_i <- optimizer(params_i, grads)

Evaluation: `method.logits(method.encode(step, aux, ctx), images, tokens)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_bench.errors import UsageError
from fpl_bench.prompt import TextTower

Params = dict[str, Tensor]


@dataclass(frozen=True)
class Placement:
    """Where each privatized step parameter gets its DP noise."""

    server: tuple[str, ...] = ()
    client: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return self.server + self.client


@dataclass(frozen=True)
class InitContext:
    """What a method may read to create its parameters and constants."""

    tower: TextTower
    generator: torch.Generator
    ctx_init: str | None = None


@dataclass(frozen=True)
class EncodeContext:
    """The text tower and the classes being scored, plus the method's frozen constants."""

    tower: TextTower
    class_idx: Tensor  # [n] class ids scored
    consts: Mapping[str, Tensor] = field(default_factory=dict)


class Method(Protocol):
    name: ClassVar[str]
    shared: ClassVar[tuple[str, ...]]
    sync: ClassVar[Literal["round", "step"]]
    privacy: ClassVar[Placement]
    needs_tokens: ClassVar[bool]
    trains: ClassVar[bool]

    def init_params(self, ctx: InitContext) -> Params: ...

    def constants(self, ctx: InitContext) -> Params: ...

    def step_params(
        self, params: Mapping[str, Tensor], generator: torch.Generator
    ) -> tuple[Params, Params]: ...

    def encode(
        self, step: Mapping[str, Tensor], aux: Mapping[str, Tensor], ctx: EncodeContext
    ) -> Any: ...

    def logits(
        self, encoded: Any, images: Tensor, tokens: Tensor | None, ctx: EncodeContext
    ) -> Tensor: ...

    def sample_loss(
        self, encoded: Any, image: Tensor, tokens: Tensor, label: Tensor, ctx: EncodeContext
    ) -> Tensor: ...

    def param_grads(
        self, params: Mapping[str, Tensor], step: Mapping[str, Tensor], grads: Mapping[str, Tensor]
    ) -> Params: ...


def random_context(ctx: InitContext) -> Tensor:
    """Context vectors [n_ctx, W]: N(0, 0.02^2) (CoOp), or the embedding of `ctx_init`."""
    tower = ctx.tower
    if ctx.ctx_init:
        phrase = tower.embed_phrase(ctx.ctx_init)
        if phrase.shape[0] == tower.n_ctx:
            return phrase
    return 0.02 * torch.randn(tower.n_ctx, tower.width, generator=ctx.generator)


def check_rank(rank: int, tower: TextTower) -> None:
    """A low-rank factor of an [n_ctx, W] prompt needs 1 <= rank <= min(n_ctx, W)."""
    limit = min(tower.n_ctx, tower.width)
    if not 1 <= rank <= limit:
        raise UsageError(
            f"--rank {rank} exceeds what a {tower.n_ctx} x {tower.width} prompt allows; "
            f"use 1 <= --rank <= {limit}"
        )


def cosine_logits(text: Tensor, images: Tensor, logit_scale: float) -> Tensor:
    """CLIP logits: logit_scale * cos(image, text). images [N, D] or [D], text [n_cls, D]."""
    return logit_scale * F.normalize(images, dim=-1) @ text.T


class PromptMethod:
    """Defaults shared by the methods whose prompt is one context tensor [n_ctx, W].

    Subclasses set `prompt_of(step, aux)`; everything else follows: the step parameters are the
    stored ones, the logits are CLIP's cosine logits, the loss is cross-entropy.
    """

    shared: ClassVar[tuple[str, ...]] = ()
    sync: ClassVar[Literal["round", "step"]] = "round"
    privacy: ClassVar[Placement] = Placement()
    needs_tokens: ClassVar[bool] = False
    trains: ClassVar[bool] = True

    def constants(self, ctx: InitContext) -> Params:
        return {}

    def step_params(
        self, params: Mapping[str, Tensor], generator: torch.Generator
    ) -> tuple[Params, Params]:
        return dict(params), {}

    def prompt_of(self, step: Mapping[str, Tensor], aux: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def encode(
        self, step: Mapping[str, Tensor], aux: Mapping[str, Tensor], ctx: EncodeContext
    ) -> Any:
        return ctx.tower.encode(self.prompt_of(step, aux), ctx.class_idx)  # [n, D]

    def logits(
        self, encoded: Any, images: Tensor, tokens: Tensor | None, ctx: EncodeContext
    ) -> Tensor:
        return cosine_logits(encoded, images, ctx.tower.logit_scale)

    def sample_loss(
        self, encoded: Any, image: Tensor, tokens: Tensor, label: Tensor, ctx: EncodeContext
    ) -> Tensor:
        logits = self.logits(encoded, image, tokens, ctx)  # [n_cls]
        return F.cross_entropy(logits.unsqueeze(0), label.unsqueeze(0))

    def param_grads(
        self, params: Mapping[str, Tensor], step: Mapping[str, Tensor], grads: Mapping[str, Tensor]
    ) -> Params:
        return dict(grads)
