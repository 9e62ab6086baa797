"""What a prompt learner is, as the driver sees it, and the pieces learners share.

A learner turns the prompt components a scheme hands it, `prompts [N, n_ctx, W]`, into class
text features with ONE text-tower forward (`encode`), scores images against them (`logits`),
and defines the per-sample loss (`sample_loss`, vmapped by `privacy/`) and an optional
data-independent `prior_loss` (KgCoOp's ||w - w_clip||^2). A prior touches no training record,
so it is applied outside per-sample clipping, gets no noise, and is not rescaled by the batch
size: the local objective is  mean_i sample_loss_i + prior.

A learner whose gradient is not that of one loss gives several per-sample losses
(`sample_losses`, a tuple) and the rule that turns their gradients into the one it trains with
(`combine_sample_grads`; by default their sum). Under DP the rule runs per sample on that
sample's own gradients, before clipping (a data-dependent transform of a sample's gradient is
part of its contribution); without DP on the gradients of the batch means. ProGrad projects the
cross-entropy gradient off the direction that conflicts with its KL to zero-shot CLIP. The prior
stays outside the rule.

A learner may own parameters (`own_params`, created by `init_params`: CoCoOp's meta-net); they
are step parameters like the scheme's prompt parameters (exact per-sample gradients, joint
clipping, noise by trust model) and reach the learner's hooks as `ctx.own`. Their names start
with the learner's name and a dot. Whether the server shares them is the scheme's choice
(`Scheme.shares_learner_params`). A learner that `reads_images` builds its text features from
each image (CoCoOp): its `encode` returns what its `logits` need to run the text tower per
image, so the per-sample loss holds that image's tower forward (batched over the samples).

A learner may evaluate (and release) a weighted average of its parameters over rounds rather
than the last ones (PromptSRC's Gaussian prompt aggregation): `round_weight` gives each
round's weight, and the driver keeps each trainer's running average of its evaluation view
(post-processing of what the rounds released, so it costs no privacy).

A learner whose loss is random (BPL's sampled residuals) takes its randomness from `draws`: a
few values drawn from the step's seeded stream (the generator `Scheme.step_params` draws
from: one per run seed, round, client and step, evaluation apart), named "<learner>.<part>".
They reach its hooks as `ctx.draws`, constants of the step like the image; a draw that must
differ per sample is derived from them and the sample's own record, never from its position
in the batch (so a sample's loss reads no other sample's presence).

A learner never calls backward, clips, draws noise or builds an optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_bench.text_tower import TextTower
from fpl_bench.vision import VisionTower

Params = dict[str, Tensor]


# A run of a learner that runs a tower per image (CoCoOp, MaPLe, IVLP, PromptSRC) took 7.5-12x a
# CoOp run of the same schedule in `fpl-bench run --methods all --eps 0.5` on the embedded
# default (wall_s, Zen 4 VM); the order of a job's runs and its worker count depend on it.
PER_IMAGE_COST = 8.0


@dataclass(frozen=True)
class InitContext:
    """What a learner or scheme may read to create its parameters and constants."""

    tower: TextTower
    generator: torch.Generator
    ctx_init: str | None = None
    vision: VisionTower | None = None  # the image tower, for a learner that prompts it


@dataclass(frozen=True)
class EncodeContext:
    """The text tower, the classes being scored, and the frozen constants of learner + scheme."""

    tower: TextTower
    class_idx: Tensor  # [n] class ids scored
    consts: Mapping[str, Tensor] = field(default_factory=dict)
    own: Mapping[str, Tensor] = field(default_factory=dict)  # the learner's own parameters
    vision: VisionTower | None = None  # the image tower, for a learner that prompts it
    draws: Mapping[str, Tensor] = field(default_factory=dict)  # the learner's step draws


def random_context(init: InitContext) -> Tensor:
    """Context vectors [n_ctx, W]: N(0, 0.02^2) (CoOp), or the embedding of `ctx_init`."""
    tower = init.tower
    if init.ctx_init:
        phrase = tower.embed_phrase(init.ctx_init)
        if phrase.shape[0] == tower.n_ctx:
            return phrase
    return 0.02 * torch.randn(tower.n_ctx, tower.width, generator=init.generator)


def template_features(tower: TextTower, template: str) -> Tensor:
    """Class features [n_cls, D] (normalised) of a hand-written prompt such as "a photo of a
    {}." for every class of the tower: zero-shot CLIP's text side, frozen."""
    return tower.encode_text([template.format(name) for name in tower.classnames])


def linear_init(fan_in: int, fan_out: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """torch.nn.Linear's default initialisation: weight [fan_out, fan_in] and bias [fan_out]
    uniform on +-1/sqrt(fan_in) (kaiming_uniform with a = sqrt(5) gives that bound)."""
    bound = 1.0 / math.sqrt(fan_in)
    weight = (torch.rand(fan_out, fan_in, generator=generator) * 2 - 1) * bound
    bias = (torch.rand(fan_out, generator=generator) * 2 - 1) * bound
    return weight, bias


EVAL_CHUNK = 128  # images per `predict_chunk` call in evaluation (`PromptLearner.predict`)


def cosine_logits(text: Tensor, images: Tensor, logit_scale: float) -> Tensor:
    """CLIP logits: logit_scale * cos(image, text). images [B, D] or [D], text [n_cls, D]."""
    return logit_scale * F.normalize(images, dim=-1) @ text.T


class PromptLearner:
    """Defaults shared by learners: context vectors initialised as CoOp's, one tower forward
    for all prompt components, cross-entropy per sample, no prior.

    Class variables a learner may override:
        trains       False for a learner with nothing to learn (zero-shot)
        needs_tokens True when logits read image patch tokens (the feature cache then keeps them)
        max_prompts  how many prompt components it can score (None: any number)
        own_params   names of the parameters it owns (each "<name>.<part>"), from init_params
        adds_prompts True when its `encode` adds prompt components of its own (own parameters:
                     PLOT's prompts 1..N-1) to the scheme's; the scheme may then have no
                     extra prompts and no text mix, which `Method.encode` takes by position
        reads_images True when its text features depend on the image (one tower forward per
                     image and class, inside the per-sample loss)
        prompts_image_tower  True when it prompts the image tower: the feature cache then
                     holds each image's tokens below the first block (`vision.VisionTower`)
                     in the tokens slot, and its logits run the tower above it per image
    """

    name: ClassVar[str]
    trains: ClassVar[bool] = True
    needs_tokens: ClassVar[bool] = False
    max_prompts: ClassVar[int | None] = 1
    own_params: ClassVar[tuple[str, ...]] = ()
    adds_prompts: ClassVar[bool] = False
    reads_images: ClassVar[bool] = False
    prompts_image_tower: ClassVar[bool] = False
    trains_text_tower: ClassVar[bool] = True  # its training runs the text tower (FedCLIP: no)

    def relative_cost(self) -> float:
        """About how many CoOp runs of the same schedule and privacy one run of this learner
        costs: `PER_IMAGE_COST` for a learner that runs a tower per image, else 1. A job orders
        its runs by it, the longest first, and decides by it whether worker processes pay
        (fpl_bench/estimates.py `cell_cost`)."""
        return PER_IMAGE_COST if self.reads_images else 1.0

    def init_params(self, init: InitContext) -> Params:
        """The learner's own parameters, named as `own_params` (none by default)."""
        return {}

    def round_weight(self, rnd: int, rounds: int) -> float | None:
        """The weight of the parameters after round `rnd` (1 .. `rounds`) in the average this
        learner is evaluated and released with; None (the default): the last parameters."""
        return None

    def draws(self, generator: torch.Generator) -> Params:
        """Random values of one step (or one evaluation), named "<learner>.<part>", from the
        step's seeded stream (none by default; module docstring)."""
        return {}

    def init_prompt(self, init: InitContext) -> Tensor:
        """One prompt component [n_ctx, W]."""
        return random_context(init)

    def constants(self, init: InitContext) -> Params:
        """Frozen tensors the learner needs (computed once per run)."""
        return {}

    def encode(self, prompts: Tensor, ctx: EncodeContext) -> Tensor:
        """Text features [M, n, D] of prompts [M, n_ctx, W] over ctx.class_idx (one forward)."""
        return ctx.tower.encode(prompts, ctx.class_idx)

    def logits(
        self,
        text: Tensor,
        images: Tensor,
        tokens: Tensor | None,
        ctx: EncodeContext,
        given: Tensor | None = None,
    ) -> Tensor:
        """Logits [B, n] (or [n] for one image) from text features [1, n, D].

        given: what `batch_constants` computed for these images (None: compute it here).
        """
        return cosine_logits(text[0], self.image_features(images, ctx), ctx.tower.logit_scale)

    def image_features(self, images: Tensor, ctx: EncodeContext) -> Tensor:
        """The image features [B, D] (or [D]) that `logits` scores: the cached ones, unless the
        learner adapts them (FedCLIP's attention adapter, with its own parameters `ctx.own`)."""
        return images

    def predict(
        self, text: Tensor, images: Tensor, tokens: Tensor | None, ctx: EncodeContext
    ) -> Tensor:
        """Predicted class positions [B] (into ctx.class_idx) of images [B, D] (tokens
        [B, P, D]): the first argmax of `logits`, by `predict_chunk` on `eval_chunk` images at
        a time. Evaluation only needs this."""
        size = self.eval_chunk(text, tokens, ctx)
        parts = [
            self.predict_chunk(
                text, images[i : i + size], None if tokens is None else tokens[i : i + size], ctx
            )
            for i in range(0, len(images), size)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=images.device)

    def eval_chunk(self, text: Tensor, tokens: Tensor | None, ctx: EncodeContext) -> int:
        """Images per `predict_chunk` call (bounds evaluation's memory)."""
        return EVAL_CHUNK

    def predict_chunk(
        self, text: Tensor, images: Tensor, tokens: Tensor | None, ctx: EncodeContext
    ) -> Tensor:
        """`logits(...).argmax(-1)` [B] for one chunk. A learner whose logits are costly may
        find the argmax without computing every logit, but must return exactly this."""
        return self.logits(text, images, tokens, ctx).argmax(-1)

    def batch_constants(self, text: Tensor, tokens: Tensor, ctx: EncodeContext) -> Tensor | None:
        """Per-sample tensors [..., B, ...] that the loss reads without a gradient through them,
        computed for the whole batch before the per-sample transforms (None: there are none).

        text [..., N, n, D] (a leading client dim when clients are stacked), tokens
        [..., B, P, D]. For work that vmap would make slower: a host sync (early exit) is an
        error under vmap, so a loop inside the vmapped loss runs its full length.
        """
        return None

    def sample_loss(
        self,
        text: Tensor,
        image: Tensor,
        tokens: Tensor,
        label: Tensor,
        ctx: EncodeContext,
        given: Tensor | None = None,
    ) -> Tensor:
        """Cross-entropy of one sample (vmapped over the batch by privacy/per_sample.py);
        given: its row of `batch_constants`, if the learner has them."""
        logits = self.logits(text, image, tokens, ctx, given)  # [n]
        return F.cross_entropy(logits.unsqueeze(0), label.unsqueeze(0))

    def sample_losses(
        self,
        text: Tensor,
        image: Tensor,
        tokens: Tensor,
        label: Tensor,
        ctx: EncodeContext,
        given: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        """Several losses of one sample whose gradients `combine_sample_grads` turns into the
        one the learner trains with (the first is the one logged). Overriding it (with or
        without `combine_sample_grads`) makes privacy/per_sample.py take every loss's gradient
        through the same backward; by default the one `sample_loss`."""
        return (self.sample_loss(text, image, tokens, label, ctx, given),)

    def combine_sample_grads(self, grads: Mapping[str, Tensor]) -> Params:
        """The gradient {name: [*shape]} from the gradients of the `sample_losses`, {name:
        [L, *shape]} over all step parameters: one sample's under DP (vmapped, before
        clipping), the batch means' without. By default their sum (the gradient of the sum of
        the losses)."""
        return {k: g.sum(0) for k, g in grads.items()}

    def prior_loss(self, text: Tensor, ctx: EncodeContext) -> Tensor | None:
        """Data-independent loss term on the text features, or None."""
        return None
