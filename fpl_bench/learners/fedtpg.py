"""FedTPG (Qiu, Li, Mummadi, Ganesh, Li, Peng, Lin, "Text-driven Prompt Generation for
Vision-Language Models in Federated Learning", ICLR 2024, arXiv:2310.06123; reference
boschresearch/FedTPG `model/prompt_net.py` (`PromptTranslator`), `model/FedTPG.py`).

A prompt generator F, one network shared by all clients (FedAvg), writes the context vectors
of a task from the text of its class names: learnable queries Q [n_ctx, W] attend to the
frozen CLIP text features T [m, D] of the task's m class names (keys and values), and a
feed-forward network follows. The context P is one for the whole task, every class's prompt
carries it, and the class text features are CLIP's as in CoOp:

    A   = MHA(LN_q(Q), LN_t(T), LN_t(T))     h heads; queries W -> W, keys and values D -> W
    P   = FF(A) + A                          FF(x) = W2 GEGLU(W1 LN_f(x) + b1) + b2,
                                             GEGLU([a, g]) = a * gelu(g), W1: W -> 2 r W
    t_c = [SOS] P_1 .. P_n_ctx [CLASS_c] [.] [EOT],   logits_c = logit_scale * cos(f(x), g(t_c))

T_c is the feature of the bare class name (the reference encodes `tokenize(classname)`, no
template), L2-normalised. The details of F are the reference's `PromptTranslator` at the
depth of its shipped training logs (`--model_depth 0`: no self-attention layers after the
cross-attention): a LayerNorm on each input of the attention (`PreNorm`), no residual around
the attention, a pre-norm GEGLU feed-forward of width multiplier 4 with a residual, 4 heads,
and torch.nn.MultiheadAttention's and torch.nn.Linear's initialisation (this learner draws the
same: Xavier-uniform projections, zero projection biases, LayerNorms at one and zero).

Where this learner departs from the reference, and why:
- widths. The reference fixes 512 for both the query width and the text-feature width
  (ViT-B/16's W and D); here they are the backbone's W and D (64 and 64 on the embedded tower),
  and the feed-forward widths scale with W.
- the queries are the scheme's prompt. The reference's queries (`soft_prompt`, [n_ctx, 512],
  drawn N(0, 0.02^2)) have the shape and the initialisation of a CoOp context, so the scheme's
  prompt component is Q: FedAvg averages it with the rest of F, as the reference's FedAvg
  averages the generator's whole state dict, and no tensor is carried unread. Any scheme that
  hands one prompt shapes the queries (local, fedprox, dpfpl's p_G + p_L, ...).
- the task. The paper's client scores only its own classes, and F reads their names; at test
  it reads the evaluated classes'. Here F reads the names of the classes being scored
  (`ctx.class_idx`): in training every client of this benchmark scores the protocol's seen
  classes (as every preset does), so every client conditions on the same names; in evaluation
  each evaluation set's classes (base, novel, all), so novel classes get their own context.
- precision: the reference runs F in fp16 (`meta_net.half()`); here F runs in fp32.

Under DP the class names are public, so T is a constant (computed once per run), and F's
weights are step parameters: F runs inside `encode`, before the tower, so the one vjp that
maps each sample's cotangent on the class features to the queries' gradient maps F's too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_bench.errors import UsageError
from fpl_bench.learners import LEARNERS
from fpl_bench.learners._base import EncodeContext, InitContext, Params, PromptLearner, linear_init

OWN = (
    "fedtpg.ln_q.weight", "fedtpg.ln_q.bias",  # LN on the queries [W]
    "fedtpg.ln_t.weight", "fedtpg.ln_t.bias",  # LN on the class-name features [D]
    "fedtpg.wq", "fedtpg.bq",  # [W, W], [W]
    "fedtpg.wk", "fedtpg.bk",  # [W, D], [W]
    "fedtpg.wv", "fedtpg.bv",  # [W, D], [W]
    "fedtpg.wo", "fedtpg.bo",  # [W, W], [W]  the attention's output projection
    "fedtpg.ln_f.weight", "fedtpg.ln_f.bias",  # LN inside the feed-forward [W]
    "fedtpg.w1", "fedtpg.b1",  # [2 r W, W], [2 r W]  (r: ff_mult)
    "fedtpg.w2", "fedtpg.b2",  # [W, r W], [W]
)  # fmt: skip
NAMES = "fedtpg_names"  # CLIP text features of the bare class names [n_cls, D]


def _layer_norm(x: Tensor, own: Mapping[str, Tensor], name: str) -> Tensor:
    weight, bias = own[f"fedtpg.{name}.weight"], own[f"fedtpg.{name}.bias"]
    return F.layer_norm(x, weight.shape, weight, bias)


def cross_attention(own: Mapping[str, Tensor], q: Tensor, t: Tensor, heads: int) -> Tensor:
    """Multi-head attention of queries q [..., n, W] over keys = values = t [m, D] -> [..., n, W]
    (torch.nn.MultiheadAttention with kdim = vdim = D, no dropout)."""
    width = q.shape[-1]
    query = F.linear(q, own["fedtpg.wq"], own["fedtpg.bq"]).unflatten(-1, (heads, -1))
    key = F.linear(t, own["fedtpg.wk"], own["fedtpg.bk"]).unflatten(-1, (heads, -1))
    value = F.linear(t, own["fedtpg.wv"], own["fedtpg.bv"]).unflatten(-1, (heads, -1))
    scores = torch.einsum("...nhd,mhd->...hnm", query, key) / math.sqrt(width // heads)
    out = torch.einsum("...hnm,mhd->...nhd", scores.softmax(-1), value).flatten(-2)
    return F.linear(out, own["fedtpg.wo"], own["fedtpg.bo"])


def feed_forward(own: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """W2 GEGLU(W1 LN_f(x) + b1) + b2 for x [..., W]."""
    hidden = F.linear(_layer_norm(x, own, "ln_f"), own["fedtpg.w1"], own["fedtpg.b1"])
    value, gate = hidden.chunk(2, dim=-1)
    return F.linear(value * F.gelu(gate), own["fedtpg.w2"], own["fedtpg.b2"])


def generate(own: Mapping[str, Tensor], queries: Tensor, names: Tensor, heads: int) -> Tensor:
    """The context P [..., n_ctx, W] of a task from queries [..., n_ctx, W] and the features of
    its class names [m, D]: A = MHA(LN_q(Q), LN_t(T)), P = FF(A) + A."""
    attended = cross_attention(
        own, _layer_norm(queries, own, "ln_q"), _layer_norm(names, own, "ln_t"), heads
    )
    return feed_forward(own, attended) + attended


def xavier_uniform(fan_out: int, fan_in: int, generator: torch.Generator) -> Tensor:
    """torch.nn.init.xavier_uniform_ of a [fan_out, fan_in] weight: U(+-sqrt(6 / (in + out)))."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(fan_out, fan_in, generator=generator) * 2 - 1) * bound


@LEARNERS.register("fedtpg")
@dataclass(frozen=True)
class FedTPG(PromptLearner):
    """The context generated from the scored classes' names by a cross-attention network."""

    heads: int  # attention heads (the reference: 4)
    ff_mult: int  # the feed-forward's hidden width is ff_mult * W (the reference: 4)

    own_params: ClassVar[tuple[str, ...]] = OWN

    def init_params(self, init: InitContext) -> Params:
        width, dim, gen = init.tower.width, init.tower.feature_dim, init.generator
        if width % self.heads:
            raise UsageError(
                f"fedtpg.heads={self.heads} does not divide the text width {width}; "
                "use a divisor of it (the reference: 4)"
            )
        if dim == width:  # torch's packed in_proj_weight [3W, W], one Xavier draw
            wq, wk, wv = xavier_uniform(3 * width, width, gen).chunk(3)
        else:  # torch's separate q/k/v_proj_weight when kdim = vdim != W
            wq, wk, wv = (xavier_uniform(width, n, gen) for n in (width, dim, dim))
        wo, _ = linear_init(width, width, gen)  # out_proj: torch.nn.Linear's weight, bias 0
        hidden = self.ff_mult * width
        w1, b1 = linear_init(width, 2 * hidden, gen)
        w2, b2 = linear_init(hidden, width, gen)
        ones, zeros = torch.ones(width), torch.zeros(width)
        values = (
            ones, zeros, torch.ones(dim), torch.zeros(dim),
            wq.contiguous(), zeros, wk.contiguous(), zeros, wv.contiguous(), zeros, wo, zeros,
            ones, zeros, w1, b1, w2, b2,
        )  # fmt: skip
        return {k: v.clone() for k, v in zip(OWN, values, strict=True)}

    def constants(self, init: InitContext) -> Params:
        return {NAMES: init.tower.encode_text(list(init.tower.classnames))}  # [n_cls, D]

    def encode(self, prompts: Tensor, ctx: EncodeContext) -> Tensor:
        """Text features [N, n, D]: the queries [N, n_ctx, W] become the context of the task
        of ctx.class_idx, which every scored class's prompt carries (one tower forward)."""
        names = ctx.consts[NAMES][ctx.class_idx]  # [n, D]
        context = generate(ctx.own, prompts, names, self.heads)  # [N, n_ctx, W]
        return ctx.tower.encode(context, ctx.class_idx)
