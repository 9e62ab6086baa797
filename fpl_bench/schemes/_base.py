"""What a federation scheme is, as the driver sees it (Flower's strategy hooks, FL-bench's
"the diff is the method").

A scheme owns a client's stored prompt parameters. Class variables declare:

    shared      stored parameter names the server holds and aggregates; the rest never leave
                the client
    sync        "round": clients train their copy of `shared` for the round's local steps and
                the server aggregates the uploads (FedAvg); "step": every local step the
                clients send the gradient of `shared` and the server applies its aggregate
                (DP-FPL). Under DP with the `server` trust model every scheme syncs per step
                (fpl_bench/privacy/placement.py decides; the scheme does not).
    n_prompts   how many prompt components `prompts` returns (the learner must accept them)
    n_extra_prompts  how many `extra_prompts` returns (they go through the tower too)
    mixes_text  True when `mix_text` combines the text features of the `n_prompts` components
                into the one component the learner scores (PromptFolio's portfolio); the
                learner must then encode text features (not a learner that `reads_images`)
    resets_shared_momentum  clear a client's momentum on `shared` when a round starts
    federates   False for a scheme where nothing leaves a client (local training)
    pools_clients  True to train ONE model on all clients' data pooled (the centralised upper
                bound); evaluation stays per client, each with the pooled model
    shares_learner_params  whether the server also holds a learner's own parameters (a
                meta-net); None, the default: shared exactly when the scheme shares a prompt
                (FedAvg averages CoCoOp's meta-net with its context; local keeps both)
    scores      True when the scheme scores images itself (`logits`, `sample_loss`) from the
                learner's text features of its components, of its `fixed_prompts` and the
                learner's image features (pFedMoAP's attention gate; FedPHA's two
                cross-entropies); the learner must score CLIP's cosine logits as
                `PromptLearner` does (method.pair_problem)

State that is not trained (SCAFFOLD's control variates, a server optimizer's moments) lives
apart from the parameters: noise placement never sees it, and it is checkpointed for --resume.

One round, in call order (the driver does it; a scheme never calls backward, clips, draws noise,
builds an optimizer or picks a device):

    params = scheme.round_download(client, params, state, server_state)  # pFedMoAP's experts
    anchor = scheme.round_start(client_params, server)      # e.g. FedProx's theta_global
    each local step:
        step, aux = scheme.step_params(params, generator)    # what gradients are taken against
        P = scheme.prompts(step, aux)                        # [N, n_ctx, W] to the learner
        E = scheme.extra_prompts(step, aux)                  # features the prior needs
        T = learner.encode(P, E)                             # one tower forward: [N, n, D], ...
        T = scheme.mix_text(T)                               # only if mixes_text: [1, n, D]
        ... per-sample loss; privacy ...
        prior = scheme.prior_loss(step, encoded, ctx, anchor)   # outside clipping, no noise
        grads = scheme.param_grads(params, step, step_grads)     # back to stored parameters
        grads = scheme.correct_grads(grads, client_state, server_state)  # post-processing
    round end (sync "round"): mean = scheme.aggregate([(shared part of p_i, n_i), ...])
                              server, server_state = scheme.server_update(server, mean, ...)
    per step (sync "step"):   server grad <- scheme.aggregate of the clients' shared gradients
    round end, every sampled client:
        client_state, sent = scheme.client_round_end(RoundEnd(start, end, steps, lr), ...)
    then the server: server_state = scheme.server_round_end(server_state, [sent, ...], n)

Under DP the state hooks read only what DP already released (the noised parameters before and
after the round, the noised gradients), so they are post-processing and cost no budget; so does
`round_download`, which reads the server's state built by them. A scheme whose server hands one
client's values to another (pFedMoAP) shares nothing through `shared`: a trusted server's noise
on a sum of clients cannot cover a value sent on alone, and its clients then noise everything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from fpl_bench.learners._base import EncodeContext, InitContext, Params, PromptLearner
from fpl_bench.schemes.aggregate import weighted_mean

Upload = tuple[Mapping[str, Tensor], float]  # (tensors, weight)


@dataclass(frozen=True)
class RoundEnd:
    """One client's round as its state hook sees it: the parameters it started from and ended
    with (the server's shared values at the round's start; its view at the end), the number
    of local steps it took, the local learning rate and the clients' SGD momentum, and which
    client it is with its FedAvg weight (its number of training examples; -1 and 1 when a
    caller does not say)."""

    start: Mapping[str, Tensor]
    end: Mapping[str, Tensor]
    steps: int
    lr: float
    momentum: float = 0.0
    client: int = -1
    weight: float = 1.0


class Scheme:
    """Defaults: stored parameters are the step parameters, no prior, FedAvg aggregation."""

    name: ClassVar[str]
    shared: ClassVar[tuple[str, ...]] = ()
    sync: ClassVar[Literal["round", "step"]] = "round"
    n_prompts: ClassVar[int] = 1
    n_extra_prompts: ClassVar[int] = 0
    mixes_text: ClassVar[bool] = False
    resets_shared_momentum: ClassVar[bool] = True
    federates: ClassVar[bool] = True
    pools_clients: ClassVar[bool] = False
    shares_learner_params: ClassVar[bool | None] = None
    scores: ClassVar[bool] = False

    def init_params(self, init: InitContext, learner: PromptLearner) -> Params:
        raise NotImplementedError

    def check(self, init: InitContext) -> None:
        """Refuse options that cannot work with this tower (e.g. a rank above n_ctx)."""

    def constants(self, init: InitContext) -> Params:
        return {}

    def step_params(
        self, params: Mapping[str, Tensor], generator: torch.Generator
    ) -> tuple[Params, Params]:
        return dict(params), {}

    def prompts(self, step: Mapping[str, Tensor], aux: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def extra_prompts(
        self, step: Mapping[str, Tensor], aux: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        return {}

    def mix_text(self, text: Tensor) -> Tensor:
        """For a scheme that `mixes_text`: the class text features the learner scores [1, n, D]
        from those of the prompt components [n_prompts, n, D] (inside the encoder function, so
        per-sample gradients and evaluation go through it)."""
        raise NotImplementedError

    # -- for a scheme that `scores` ----------------------------------------------------------
    def fixed_prompts(self, aux: Mapping[str, Tensor]) -> Tensor | None:
        """Prompt components [K, n_ctx, W] that are constants of the step (pFedMoAP's
        downloaded experts): the learner encodes them in a forward of their own, without
        gradient, as `encoded["fixed"]` [K, n, D]; None: there are none."""
        return None

    def score_inputs(self, step: Mapping[str, Tensor], aux: Mapping[str, Tensor]) -> Params:
        """What `logits` reads besides text and image features (step parameters ride the
        encoder's vjp, so their per-sample gradients are exact): `encoded["scheme"]`."""
        return {}

    def logits(self, encoded: Mapping[str, Any], images: Tensor, logit_scale: float) -> Tensor:
        """Logits [B, n] (or [n] for one image [D]) of the learner's image features [B, D]
        from `encoded` (Method.encode's dict: "text" [N, n, D], extra and fixed features,
        "scheme": `score_inputs`)."""
        raise NotImplementedError

    def sample_loss(
        self, encoded: Mapping[str, Any], image: Tensor, label: Tensor, logit_scale: float
    ) -> Tensor:
        """The loss of one sample (image [D], label 0-dim): cross-entropy of `logits`."""
        logits = self.logits(encoded, image, logit_scale)
        return torch.nn.functional.cross_entropy(logits.unsqueeze(0), label.unsqueeze(0))

    def prior_loss(
        self,
        step: Mapping[str, Tensor],
        encoded: Mapping[str, Any],
        ctx: EncodeContext,
        anchor: Mapping[str, Tensor],
    ) -> Tensor | None:
        return None

    def param_grads(
        self, params: Mapping[str, Tensor], step: Mapping[str, Tensor], grads: Mapping[str, Tensor]
    ) -> Params:
        return dict(grads)

    def round_download(
        self,
        client: int,
        params: Mapping[str, Tensor],
        state: Mapping[str, Tensor],
        server: Mapping[str, Tensor],
    ) -> Params:
        """The stored parameters sampled client `client` starts its round with, from its own
        (after the server's shared values were copied in), its state and the server's state:
        a scheme whose server state holds what clients download (pFedMoAP's pool of the
        clients' prompts) sets it here; default unchanged."""
        return dict(params)

    def round_start(self, params: Mapping[str, Tensor], server: Mapping[str, Tensor]) -> Params:
        """What the client keeps from the round's start (FedProx's anchor); default nothing."""
        return {}

    def aggregate(self, uploads: Sequence[Upload]) -> Params:
        """Server rule over [(tensors, weight), ...]: FedAvg's weighted mean."""
        return weighted_mean(uploads)

    # -- state that is not trained, and the hooks that keep it -----------------------------
    def init_state(self, params: Mapping[str, Tensor]) -> tuple[Params, Params]:
        """(each client's state, the server's state) at the start; default none."""
        return {}, {}

    def correct_grads(
        self, grads: Mapping[str, Tensor], state: Mapping[str, Tensor], server: Mapping[str, Tensor]
    ) -> Params:
        """The gradients a client applies to its locally trained parameters, from those the
        step computed (after DP noise); default unchanged."""
        return dict(grads)

    def client_round_end(
        self, done: RoundEnd, state: Mapping[str, Tensor], server: Mapping[str, Tensor]
    ) -> tuple[Params, Params]:
        """(the client's new state, what it sends the server about it); default unchanged."""
        return dict(state), {}

    def server_round_end(
        self, server: Mapping[str, Tensor], sent: Sequence[Mapping[str, Tensor]], n_clients: int
    ) -> Params:
        """The server's new state from what the round's clients sent; default unchanged."""
        return dict(server)

    def server_update(
        self,
        params: Mapping[str, Tensor],
        mean: Mapping[str, Tensor],
        state: Mapping[str, Tensor],
    ) -> tuple[Params, Params]:
        """The server optimizer of a round-synchronised round: (new shared values, new server
        state) from the old values and the aggregate of the uploads. FedAvg takes the
        aggregate; a server optimizer (FedAdam) steps along aggregate - old instead."""
        return {**params, **mean}, dict(state)


class OnePrompt(Scheme):
    """A scheme whose client holds one prompt component, `prompt` [n_ctx, W], handed to the
    learner as is (FedAvg, local, central and the schemes built on them)."""

    def init_params(self, init: InitContext, learner: PromptLearner) -> Params:
        return {"prompt": learner.init_prompt(init)}  # [n_ctx, W]

    def prompts(self, step: Mapping[str, Tensor], aux: Mapping[str, Tensor]) -> Tensor:
        return step["prompt"].unsqueeze(0)  # [1, n_ctx, W]


def check_rank(rank: int, init: InitContext, option: str) -> None:
    """A low-rank factor of an [n_ctx, W] prompt needs 1 <= rank <= min(n_ctx, W)."""
    from fpl_bench.errors import UsageError

    tower = init.tower
    limit = min(tower.n_ctx, tower.width)
    if not 1 <= rank <= limit:
        raise UsageError(
            f"{option}={rank} exceeds what a {tower.n_ctx} x {tower.width} prompt allows; "
            f"use 1 <= rank <= {limit}"
        )
