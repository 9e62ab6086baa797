"""PromptSRC (Khattak, Wasim, Naseer, Khan, Yang, Khan, "Self-regulating Prompts: Foundational
Model Adaptation without Forgetting", ICCV 2023, arXiv:2307.06948; reference
muzairkhattak/PromptSRC `trainers/promptsrc.py`, `trainers/imagenet_templates.py`).

IVLP's deep prompts in both towers (`fpl_bench/learners/ivlp.py`), trained to agree with frozen
CLIP (the paper's self-consistency constraints) with a textual target averaged over N
hand-written templates (its textual diversity):

    f~_p, g~_p  the prompted image feature and class text features (normalised)
    f~          frozen CLIP's image feature (the cached one, normalised)
    g~          normalise(mean_t g~_t): frozen CLIP's class features of N templates t
    z_p = s f~_p g~_p^T,   z = s f~ g~^T      (s: CLIP's logit scale; n scored classes)

    L_SCL-image  = lambda_1 mean_d |f~_p - f~|                       lambda_1 = 10
    L_SCL-text   = lambda_2 mean_{c,d} |g~_p - g~|                   lambda_2 = 25
    L_SCL-logits = w KL(softmax z || softmax z_p) / n                w = 1
    L = CE(z_p, y) + L_SCL-image + L_SCL-text + L_SCL-logits

The reductions are the reference's: L1 as the mean over the feature dimension (over classes and
dimension for the text term), the KL summed over the n scored classes and divided by n (its
`kl_div(..., reduction="sum") / logits.numel()`), temperature 1: its config's weights (image
10, text 25) go with them. The text term runs over the step's scored classes (the reference:
all training classes, the same when every class is scored). The reference's target averages
the templates' unnormalised features before normalising; here each template's feature is
normalised first (CLIP's prompt ensemble), as fpl-bench's frozen text tower gives them.

Under DP the first three terms read the sample's image: they are its per-sample loss, clipped.
The text term reads no training record (the prompted text features and a frozen target): it is
a prior, applied outside clipping with no noise (`fpl_bench/learners/_base.py`), so it costs no
privacy.

Gaussian prompt aggregation (GPA, the paper's self-ensemble, Sec. 3.2): the model evaluated
and released is the weighted mean of the prompts after each epoch,

    P_GPA = sum_r w_r P_r / sum_r w_r,   w_r = N(r / R; mu, sigma)

(the reference: epochs r = 1..20 with weights N(r; 15, 1), i.e. mu = 0.75, sigma = 0.05 as
fractions of the run; here an epoch is a federated round, as FLiP takes it, and R the run's
rounds). Training continues from the live prompts; the driver keeps each trainer's running
mean (`round_weight`, fpl_bench/driver.py). An evaluation before the last round sees the mean
of the rounds so far. Under DP it is post-processing of the rounds' released prompts. FLiP
instead loads its running weighted sum back into the model it trains, so its early rounds
train from prompts scaled by weights near zero; fpl-bench follows the paper. `gpa_std = 0`
turns GPA off (the last prompts are evaluated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from fpl_bench.learners import LEARNERS
from fpl_bench.learners._base import EncodeContext, InitContext, Params, template_features
from fpl_bench.learners.ivlp import IVLP

TARGET = "promptsrc_text"  # g~ [n_cls, D]: the templates' mean class feature, normalised

# The reference's IMAGENET_TEMPLATES, in its order: 60 of the 80 ImageNet prompt templates of
# openai/CLIP's notebook Prompt_Engineering_for_ImageNet.ipynb.
TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
)


def l1_mean(a: Tensor, b: Tensor) -> Tensor:
    """The mean absolute difference over all elements (torch's l1_loss, reduction "mean")."""
    return (a - b).abs().mean()


def kl_per_class(zero_shot: Tensor, logits: Tensor) -> Tensor:
    """KL(softmax(zero_shot) || softmax(logits)) over the last dim, divided by its size: one
    sample's share of the reference's kl_div(log p, log q, "sum", log_target) / numel."""
    log_q = F.log_softmax(zero_shot, dim=-1)
    log_p = F.log_softmax(logits, dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1) / logits.shape[-1]


@LEARNERS.register("promptsrc")
@dataclass(frozen=True)
class PromptSRC(IVLP):
    """IVLP's deep prompts regulated towards frozen CLIP's features and logits."""

    image_weight: float  # lambda_1
    text_weight: float  # lambda_2
    logits_weight: float  # w (1 in the paper and the reference)
    n_templates: int  # N: the first N of TEMPLATES make the textual target
    gpa_mean: float  # mu of GPA's weights, as a fraction of the rounds
    gpa_std: float  # sigma of GPA's weights, as a fraction of the rounds (0: no GPA)

    own_params: ClassVar[tuple[str, ...]] = ("promptsrc.text_deep", "promptsrc.vision")

    def constants(self, init: InitContext) -> Params:
        """IVLP's, and the textual target g~ [n_cls, D] (one text forward per template)."""
        total = template_features(init.tower, TEMPLATES[0])
        for template in TEMPLATES[1 : self.n_templates]:  # one at a time: [n_cls, D] each
            total = total + template_features(init.tower, template)
        return {**super().constants(init), TARGET: F.normalize(total, dim=-1)}

    def sample_loss(  # type: ignore[override]
        self,
        text: dict[str, Tensor],
        image: Tensor,
        tokens: Tensor,
        label: Tensor,
        ctx: EncodeContext,
        given: Tensor | None = None,
    ) -> Tensor:
        """CE + L_SCL-image + L_SCL-logits of one sample: `image` [D] is frozen CLIP's feature
        of its image, `tokens` [T, W_v] the image tower's cached input tokens."""
        prompted = self.image_features_with(text, tokens.unsqueeze(0), ctx)[0]  # [D]
        frozen = F.normalize(image, dim=-1)
        scale = ctx.tower.logit_scale
        logits = scale * prompted @ text["text"][0].T  # [n]
        zero_shot = scale * frozen @ ctx.consts[TARGET][ctx.class_idx].T
        ce = F.cross_entropy(logits.unsqueeze(0), label.unsqueeze(0))
        image_term = self.image_weight * l1_mean(prompted, frozen)
        return ce + image_term + self.logits_weight * kl_per_class(zero_shot, logits)

    def round_weight(self, rnd: int, rounds: int) -> float | None:
        """GPA's weight of round `rnd` of `rounds`: exp(-(r / R - mu)^2 / (2 sigma^2)) (the
        Gaussian density up to its constant, which the mean divides out); None without GPA."""
        if self.gpa_std <= 0:
            return None
        return math.exp(-0.5 * ((rnd / rounds - self.gpa_mean) / self.gpa_std) ** 2)

    def prior_loss(self, text: dict[str, Tensor], ctx: EncodeContext) -> Tensor:  # type: ignore[override]
        """L_SCL-text over the scored classes: no training record in it."""
        return self.text_weight * l1_mean(text["text"][0], ctx.consts[TARGET][ctx.class_idx])
