"""FedCLIP's attention-based adapter (Lu, Hu, Wang, Xie, "FedCLIP: Fast Generalization and
Personalization for CLIP in Federated Learning", IEEE Data Eng. Bull. 2023, arXiv:2302.13485;
reference microsoft/PersonalizedFL `fedclip/` (`img_adap`), as copied in Yuqin-G/PMFLT
`model/FedCLIP.py`, `federated/client_fedclip.py`).

Nothing is prompted: an adapter g on the frozen image feature f [D] (the paper's AttAI) gives
an attention vector over the feature's entries, which reweights f; the text side is CLIP's
hand-written prompt "a photo of a {}.", frozen (zero-shot CLIP's class features t_c):

    a = softmax(W2 tanh(W1 f + b1) + b2)        W1, W2 [D, D]; softmax over the D entries
    f* = a * f                                  (elementwise)
    logits_c = logit_scale * cos(f*, t_c)

The reference's `img_adap` is exactly Linear(D, D) -> Tanh -> Linear(D, D) -> Softmax(dim=1),
torch.nn.Linear's initialisation (so is this learner's), and it is the only thing trained and,
under FedAvg, the only thing averaged: FedCLIP is this learner with the `fedavg` scheme.

Where this departs from the reference, and why:
- the loss. The reference trains with CLIP's symmetric contrastive loss over the batch (each
  image against the prompts of the batch's labels and back, targets arange(B)), so a sample's
  term reads the other samples of its batch: there is no per-sample gradient for DP-SGD to
  clip (and two images of one class in a batch get contradicting targets). Here each sample's
  loss is the cross-entropy of its logits over the scored classes: the image-to-text half with
  every class's prompt in place of the batch's, which is how the reference scores at test time.
- the input. The feature cache holds L2-normalised image features (`fpl_bench/features.py`),
  so g reads f / ||f|| where the reference reads the raw f; the logits are unchanged by the
  scale of f, the adapter's input is not.

The seam hands every learner the scheme's prompt: this learner reads none, so the scheme's
context is carried (and under DP noised and released) but has no effect and zero gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_bench.learners import LEARNERS
from fpl_bench.learners._base import (
    EncodeContext,
    InitContext,
    Params,
    PromptLearner,
    linear_init,
    template_features,
)

OWN = ("fedclip_adapter.w1", "fedclip_adapter.b1", "fedclip_adapter.w2", "fedclip_adapter.b2")
TEXT = "fedclip_adapter_text"  # the hand-written prompt's class features [n_cls, D]


def attention(own: Mapping[str, Tensor], images: Tensor) -> Tensor:
    """a = softmax(W2 tanh(W1 f + b1) + b2) over the last dim, for features f [..., D]."""
    hidden = torch.tanh(F.linear(images, own["fedclip_adapter.w1"], own["fedclip_adapter.b1"]))
    return F.linear(hidden, own["fedclip_adapter.w2"], own["fedclip_adapter.b2"]).softmax(-1)


@LEARNERS.register("fedclip_adapter")
@dataclass(frozen=True)
class FedCLIPAdapter(PromptLearner):
    """Image features reweighted by an attention adapter, scored against a frozen prompt."""

    template: str  # the hand-written prompt whose class features score the adapted images

    own_params: ClassVar[tuple[str, ...]] = OWN
    trains_text_tower: ClassVar[bool] = False  # the class features are computed once

    def init_params(self, init: InitContext) -> Params:
        dim = init.tower.feature_dim
        w1, b1 = linear_init(dim, dim, init.generator)
        w2, b2 = linear_init(dim, dim, init.generator)
        return dict(zip(OWN, (w1, b1, w2, b2), strict=True))

    def constants(self, init: InitContext) -> Params:
        return {TEXT: template_features(init.tower, self.template)}

    def encode(self, prompts: Tensor, ctx: EncodeContext) -> Tensor:
        """The frozen class features [M, n, D], one copy per prompt component (none is read)."""
        text = ctx.consts[TEXT][ctx.class_idx]
        return text.expand(prompts.shape[0], *text.shape)

    def image_features(self, images: Tensor, ctx: EncodeContext) -> Tensor:
        """f* = a * f [B, D] (or [D]): the cached feature reweighted by the adapter."""
        return attention(ctx.own, images) * images
