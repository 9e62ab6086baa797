"""A method = a prompt learner x a federation scheme (docs/design.md, "Two axes").

`build_method(choice)` turns a resolved card (`fpl_bench.catalog.MethodChoice`) into a `Method`
holding a learner and a scheme instance; `pair_problem` says why a pair cannot work, and the
spec refuses such a pair (fpl_bench/spec.py), so a method built from a spec's choice is one that
works. The `Method` composes their hooks into what the driver and `privacy/` call:

    encode(step, aux, ctx)   the scheme's prompt components [N, n_ctx, W] and the extra prompts
                             its prior needs go through the learner's encoder in ONE tower
                             forward -> {"text": [N, n, D], <extra name>: [n, D], ...}
    batch_constants(...)     what the learner's loss reads without gradient, for the whole batch
                             before vmap (FedOTP: the transport plans), or None
    sample_loss(...)         the learner's per-sample loss (vmapped, clipped under DP), or its
                             several losses [L] (ProGrad's) when it `has_several_losses`, and
    combine_sample_grads(g)  its rule for their gradients: per sample, before clipping
    prior(step, encoded, ..) learner prior + scheme prior: data-independent, outside clipping
    logits(...)              the learner's scores

A scheme that `scores` (pFedMoAP's gate, FedPHA's two cross-entropies) takes `logits` and
`sample_loss` over from a learner that scores CLIP's cosine logits (`learner_scoring` names
what else a learner does, and `pair_problem` refuses it): `encode` then adds the scheme's
`score_inputs` ("scheme") and the features of its `fixed_prompts` ("fixed", a forward of their
own without gradient), and the scheme scores the learner's `image_features`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from fpl_bench.catalog import MethodChoice
from fpl_bench.learners import LEARNERS
from fpl_bench.learners._base import (
    EVAL_CHUNK,
    EncodeContext,
    InitContext,
    Params,
    PromptLearner,
)
from fpl_bench.schemes import SCHEMES
from fpl_bench.schemes._base import Scheme

Encoded = dict[str, Tensor]


def pair_problem(learner: type, scheme: type) -> str | None:
    """Why `learner` cannot work under `scheme`, or None when the pair is valid."""
    if not learner.trains and scheme.federates:
        alone = [n for n in SCHEMES.names() if not SCHEMES.get(n).federates]
        return (
            f"{learner.name} has nothing to train, so there is nothing to federate; "
            f"use {' or '.join(f'{learner.name}@{n}' for n in alone)}"
        )
    if learner.reads_images and scheme.n_extra_prompts:
        return (
            f"{scheme.name}'s prior reads the text features of {scheme.n_extra_prompts} extra "
            f"prompt(s), which {learner.name} builds per image; use a scheme without a prompt "
            "prior (e.g. fedavg, local)"
        )
    if learner.reads_images and scheme.mixes_text:
        return (
            f"{scheme.name} mixes its prompt components' text features, which {learner.name} "
            "builds per image; use a learner that encodes the prompts once (e.g. coop, kgcoop)"
        )
    if learner.adds_prompts and scheme.n_extra_prompts:
        return (
            f"{learner.name} adds prompt components of its own, which {scheme.name}'s prior "
            "would take for its extra prompts; use a scheme without a prompt prior (e.g. fedavg, "
            "local)"
        )
    if learner.adds_prompts and scheme.mixes_text:
        return (
            f"{learner.name} adds prompt components of its own, which {scheme.name}'s mix of "
            "its prompts' text features would leave out; use a scheme that does not mix (e.g. "
            "fedavg, local)"
        )
    if scheme.scores:
        scoring = learner_scoring(learner)
        if scoring:
            return (
                f"{scheme.name} scores images itself against its prompts' text features, which "
                f"{learner.name} {scoring}; use a learner that scores CLIP's cosine logits "
                "(e.g. coop, kgcoop)"
            )
        return None
    limit, scored = learner.max_prompts, 1 if scheme.mixes_text else scheme.n_prompts
    if limit is not None and scored > limit:
        return (
            f"{learner.name} scores {limit} prompt component(s) but {scheme.name} hands it "
            f"{scored}; use a learner that scores several (e.g. ot), or a scheme "
            "that sums its parts into one prompt (e.g. dpfpl)"
        )
    return None


# What a learner overrides when it scores images in a way of its own (not CLIP's cosine logits
# of one set of text features), which a scheme that `scores` would bypass.
_SCORING_HOOKS = (
    "logits",
    "predict",
    "predict_chunk",
    "sample_loss",
    "sample_losses",
    "batch_constants",
)


def learner_scoring(learner: type) -> str | None:
    """How `learner` departs from scoring CLIP's cosine logits of its text features (what a
    scheme that `scores` replaces), or None when it does not."""
    if learner.reads_images or learner.prompts_image_tower:
        return "builds per image"
    if learner.adds_prompts:
        return "extends with prompt components of its own"
    if learner.needs_tokens:
        return "scores against image patch tokens"
    own = [h for h in _SCORING_HOOKS if getattr(learner, h) is not getattr(PromptLearner, h)]
    if own:
        return f"scores with its own {', '.join(own)}"
    return None


def all_pairs() -> list[tuple[str, str, str | None]]:
    """(learner, scheme, problem or None) for every registered learner x scheme."""
    return [
        (lname, sname, pair_problem(LEARNERS.get(lname), SCHEMES.get(sname)))
        for lname in LEARNERS.names()
        for sname in SCHEMES.names()
    ]


@dataclass(frozen=True)
class Method:
    """One runnable method: a learner and a scheme, and the label it is reported under."""

    label: str
    learner: PromptLearner
    scheme: Scheme

    @property
    def trains(self) -> bool:
        return self.learner.trains

    @property
    def needs_tokens(self) -> bool:
        return self.learner.needs_tokens

    @property
    def prompts_image_tower(self) -> bool:
        return self.learner.prompts_image_tower

    @property
    def own(self) -> tuple[str, ...]:
        """The learner's own parameter names."""
        return self.learner.own_params

    @property
    def shared(self) -> tuple[str, ...]:
        """Parameter names the server holds: the scheme's shared ones, and the learner's own
        when the scheme shares them (by default: when it shares anything)."""
        shares = self.scheme.shares_learner_params
        if shares is None:
            shares = bool(self.scheme.shared)
        return self.scheme.shared + (self.own if shares else ())

    def init(self, init: InitContext) -> tuple[Params, Params]:
        """(initial stored parameters, frozen constants of learner and scheme)."""
        self.scheme.check(init)
        params = self.scheme.init_params(init, self.learner)
        own = self.learner.init_params(init)
        if tuple(own) != self.own or set(own) & set(params):
            raise ValueError(f"{self.learner.name}.init_params gave {list(own)}, not {self.own}")
        consts = {**self.learner.constants(init), **self.scheme.constants(init)}
        return {**params, **own}, consts

    def _own(self, params: Mapping[str, Tensor]) -> Params:
        """The learner's own parameters among `params`."""
        return {k: params[k] for k in self.own if k in params}

    def _split(self, params: Mapping[str, Tensor]) -> tuple[Params, Params]:
        """(the scheme's parameters, the learner's own)."""
        own = self._own(params)
        return {k: v for k, v in params.items() if k not in own}, own

    def step_params(
        self,
        params: Mapping[str, Tensor],
        generator: torch.Generator,
        draws_from: torch.Generator | None = None,
    ) -> tuple[Params, Params]:
        """The scheme's step parameters (and aux) plus the learner's own, taken as stored; the
        learner's random draws of the step (`PromptLearner.draws`, drawn on the CPU generator
        `draws_from`, else `generator`, and moved to the parameters' device) join the aux."""
        mine, own = self._split(params)
        step, aux = self.scheme.step_params(mine, generator)
        device = next(iter(params.values())).device
        drawn = self.learner.draws(generator if draws_from is None else draws_from)
        draws = {k: v.to(device) for k, v in drawn.items()}
        return {**step, **own}, {**aux, **draws}

    def param_grads(
        self, params: Mapping[str, Tensor], step: Mapping[str, Tensor], grads: Mapping[str, Tensor]
    ) -> Params:
        """Gradients of the stored parameters: the scheme maps its own; the learner's pass."""
        mine, _ = self._split(params)
        scheme_step, _ = self._split(step)
        scheme_grads, own = self._split(grads)
        return {**self.scheme.param_grads(mine, scheme_step, scheme_grads), **own}

    def upload(self, params: Mapping[str, Tensor]) -> Params:
        """What leaves a client at the end of a round-synchronised round: `shared`."""
        return {k: params[k] for k in self.shared}

    def encode(
        self, step: Mapping[str, Tensor], aux: Mapping[str, Tensor], ctx: EncodeContext
    ) -> Encoded:
        """{"text": the learner's encoding, <extra name>: [n, D], "own": the learner's own
        parameters (only when it has some: passed through, so that gradients reach them
        through the same vjp as the prompts'), "draws": the learner's random draws of the step
        (only when it has some: constants its loss reads, float so that they ride the vjp)}."""
        prompts = self.scheme.prompts(step, aux)  # [N, n_ctx, W]
        extras = self.scheme.extra_prompts(step, aux)  # {name: [n_ctx, W]}
        n = prompts.shape[0]
        if extras:
            prompts = torch.cat([prompts, torch.stack(list(extras.values()))])
        own = self._own(step)
        draws = self._draws(aux)
        if draws:
            ctx = replace(ctx, draws=draws)
        features = self.learner.encode(prompts, self._with_own(ctx, own))  # [N + E, n_cls, D]
        if not extras:  # the learner's encoding as it is (a learner may return a dict)
            out = {"text": features}
        else:
            out = {"text": features[:n]}
            out.update({name: features[n + i] for i, name in enumerate(extras)})
        if self.scheme.mixes_text:  # [N, n_cls, D] -> [1, n_cls, D] (PromptFolio)
            out["text"] = self.scheme.mix_text(out["text"])
        if self.scheme.scores:  # the scheme scores: its constant prompts and its inputs
            fixed = self.scheme.fixed_prompts(aux)
            if fixed is not None:  # a forward of their own, no gradient: no backward rows
                with torch.no_grad():
                    out["fixed"] = self.learner.encode(fixed, self._with_own(ctx, own)).detach()
            inputs = self.scheme.score_inputs(step, aux)
            if inputs:
                out["scheme"] = inputs
        if own:
            out["own"] = own
        if draws:
            out["draws"] = draws
        return out

    def _draws(self, aux: Mapping[str, Tensor]) -> Params:
        """The learner's random draws among a step's aux (named "<learner>.<part>")."""
        prefix = f"{self.learner.name}."
        return {k: v for k, v in aux.items() if k.startswith(prefix)}

    @staticmethod
    def _with_own(ctx: EncodeContext, own: Mapping[str, Tensor]) -> EncodeContext:
        return replace(ctx, own=own) if own else ctx

    def _ctx(self, encoded: Encoded, ctx: EncodeContext) -> EncodeContext:
        draws = encoded.get("draws")
        if draws:
            ctx = replace(ctx, draws=draws)
        return self._with_own(ctx, encoded.get("own", {}))

    def logits(
        self, encoded: Encoded, images: Tensor, tokens: Tensor | None, ctx: EncodeContext
    ) -> Tensor:
        ctx = self._ctx(encoded, ctx)
        if self.scheme.scores:  # on the learner's image features (FedCLIP's adapter)
            features = self.learner.image_features(images, ctx)
            return self.scheme.logits(encoded, features, ctx.tower.logit_scale)
        return self.learner.logits(encoded["text"], images, tokens, ctx)

    def predict(
        self, encoded: Encoded, images: Tensor, tokens: Tensor | None, ctx: EncodeContext
    ) -> Tensor:
        """Predicted class positions [B]: `logits(...).argmax(-1)`, as the learner finds it
        (by the scheme's logits, EVAL_CHUNK images at a time, when the scheme `scores`)."""
        if self.scheme.scores:
            parts = [
                self.logits(encoded, images[i : i + EVAL_CHUNK], None, ctx).argmax(-1)
                for i in range(0, len(images), EVAL_CHUNK)
            ]
            empty = torch.zeros(0, dtype=torch.long, device=images.device)
            return torch.cat(parts) if parts else empty
        return self.learner.predict(encoded["text"], images, tokens, self._ctx(encoded, ctx))

    def batch_constants(
        self, encoded: Encoded, tokens: Tensor, ctx: EncodeContext
    ) -> Tensor | None:
        return self.learner.batch_constants(encoded["text"], tokens, self._ctx(encoded, ctx))

    def sample_loss(
        self,
        encoded: Encoded,
        image: Tensor,
        tokens: Tensor,
        label: Tensor,
        ctx: EncodeContext,
        given: Tensor | None = None,
        *,
        several: bool = False,
    ) -> Tensor:
        """The learner's loss of one sample; with `several`, its `sample_losses` stacked [L]
        (for a learner that `has_several_losses`)."""
        ctx = self._ctx(encoded, ctx)
        if self.scheme.scores:
            features = self.learner.image_features(image, ctx)
            return self.scheme.sample_loss(encoded, features, label, ctx.tower.logit_scale)
        if several:
            text = encoded["text"]
            return torch.stack(self.learner.sample_losses(text, image, tokens, label, ctx, given))
        return self.learner.sample_loss(encoded["text"], image, tokens, label, ctx, given)

    def combine_sample_grads(self, grads: Mapping[str, Tensor]) -> Params:
        """The learner's rule: {name: [L, *shape]} gradients of `sample_losses` -> {name:
        [*shape]}, over all step parameters (the scheme's and the learner's own)."""
        return self.learner.combine_sample_grads(grads)

    @property
    def has_several_losses(self) -> bool:
        return type(self.learner).sample_losses is not PromptLearner.sample_losses

    def prior(
        self,
        step: Mapping[str, Tensor],
        encoded: Encoded,
        ctx: EncodeContext,
        anchor: Mapping[str, Tensor],
    ) -> Tensor | None:
        """Learner prior + scheme prior (None when neither has one)."""
        terms = [
            self.learner.prior_loss(encoded["text"], self._ctx(encoded, ctx)),
            self.scheme.prior_loss(step, encoded, ctx, anchor),
        ]
        terms = [t for t in terms if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    @property
    def has_batch_constants(self) -> bool:
        return type(self.learner).batch_constants is not PromptLearner.batch_constants

    @property
    def has_prior(self) -> bool:
        learner_prior = type(self.learner).prior_loss is not PromptLearner.prior_loss
        scheme_prior = type(self.scheme).prior_loss is not Scheme.prior_loss
        return learner_prior or scheme_prior


def build_method(choice: MethodChoice) -> Method:
    """Instantiate the learner and scheme of a resolved card whose pair the spec accepted."""
    learner_cls, scheme_cls = LEARNERS.get(choice.learner), SCHEMES.get(choice.scheme)
    return Method(
        label=choice.label,
        learner=learner_cls(**choice.learner_options),
        scheme=scheme_cls(**choice.scheme_options),
    )


def method_from_name(name: str, overrides: dict[str, Any] | None = None) -> Method:
    """Shortcut for tests and scripts: resolve a card name and build it."""
    from fpl_bench.catalog import resolve_method

    return build_method(resolve_method(name, overrides))
