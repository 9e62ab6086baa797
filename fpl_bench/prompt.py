"""Learnable context vectors through the frozen text tower of an open_clip CLIP.

CoOp (Zhou et al., IJCV 2022, arXiv:2109.01134; reference KaiyangZhou/CoOp `trainers/coop.py`)
replaces the hand-written words of "a photo of a {class}." by n_ctx learnable vectors:

    prompt_c = [SOS] [V]_1 ... [V]_n_ctx [CLASS_c tokens] [.] [EOT] [pad ...]

The sequence runs through the frozen `transformer`, `ln_final` and `text_projection`, and the
feature of class c is the output at its EOT position.

Truncation (exact): open_clip's text transformer is causal (`attn_mask` is upper-triangular
-inf), so the output at position t depends only on tokens <= t. Every token after the longest EOT
position among the prompts is therefore irrelevant to every pooled feature, and the tower runs
on the first `max(eot) + 1` positions only. `tests/test_prompt.py` checks equality with the full
length.

Shared prefix (exact, the default where the tower allows it): the first 1 + n_ctx positions
(SOS and the context vectors) are the same for every class, and by causality so are their
hidden states in every layer. `encode` therefore runs them once per prompt, as a prefix stream
[*lead, 1 + n_ctx, W], and runs only the class-specific positions per class, as a suffix stream
[*lead, n, S - 1 - n_ctx, W] whose queries attend to the prefix's keys and values and causally to
their own. In the last layer only the EOT rows are computed (queries, MLP), and the prefix only
gives keys and values. On the embedded default (16 context vectors, EOT at 20) a per-sample
backward then touches 17 + 32 x 4 rows per layer instead of 32 x 21. The path is taken when every
block is open_clip's standard `ResidualAttentionBlock` (nn.MultiheadAttention) under its causal
mask; any other tower runs through its own modules (`share_prefix=False` forces that, the
reference compute pattern). tests/test_speed.py checks equality with the module path.

Backward: for per-sample gradients (under `compute.per_sample_backward`, which
privacy/per_sample.py sets) the shared-prefix path is one autograd node whose backward is written
out and batched over the samples' cotangents (fpl_bench/tower_vjp.py; equal to autograd's to
rounding); otherwise, and with `hand_backward=False`, autograd runs through the ops below.

Precision: `precision="bf16"` runs the frozen tower under bf16 autocast (matmuls in bf16, the
residual stream, layer norms, softmax and the returned features in fp32); `"fp32"` is exact
float32. Exact GELU is kept (never swapped for the tanh form): its derivative is computed once in
the forward and the backward is one multiply, which a per-sample (vmapped) backward repeats B
times instead of re-evaluating erf and exp.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fpl_bench import tower_vjp
from fpl_bench.compute import per_sample_backward_ahead, wide
from fpl_bench.errors import UsageError

PLACEHOLDER = "X"

Precision = Literal["fp32", "bf16"]


def _text_module(model: nn.Module) -> nn.Module:
    """The module that owns the text tower: `CLIP` itself or `CustomTextCLIP.text`."""
    text = getattr(model, "text", None)
    return text if isinstance(text, nn.Module) else model


@dataclass(eq=False)
class TextTower:
    """Frozen text tower that takes context vectors in place of prompt words.

    Holds, for each class, the token embeddings around the context slots, cut to the truncated
    length `seq_len`:
        prefix  [n_cls, 1, W]                  the SOS embedding
        suffix  [n_cls, seq_len - 1 - n_ctx, W] class-name tokens, '.', EOT, padding
        eot     [n_cls]                         EOT position of each class prompt
    """

    prefix: Tensor
    suffix: Tensor
    eot: Tensor
    seq_len: int  # positions the tower runs on for the class prompts (max EOT + 1)
    positional: Tensor  # [context_length, W]
    attn_mask: Tensor | None  # [context_length, context_length]
    transformer: nn.Module
    ln_final: nn.Module
    projection: Tensor | nn.Module | None
    token_embedding: nn.Module
    tokenizer: Callable[[list[str]], Tensor]
    classnames: tuple[str, ...]
    n_ctx: int
    logit_scale: float
    share_prefix: bool = False  # run SOS + context once per prompt (needs `fast_blocks`)
    fast_blocks: bool = False  # every block is a standard open_clip block under a causal mask
    precision: Precision = "fp32"
    hand_backward: bool = False  # shared-prefix path through tower_vjp (needs share_prefix)

    @property
    def width(self) -> int:
        """W, the width of the token embeddings (and of a context vector)."""
        return int(self.prefix.shape[-1])

    @property
    def feature_dim(self) -> int:
        """D, the width of the projected text features (that of the image features too)."""
        with torch.no_grad():
            return int(self._project(self.positional[:1]).shape[-1])

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def rows(self, n_classes: int) -> int:
        """Token rows one prompt runs through the tower for `n_classes` classes:
        1 + n_ctx + n (S - 1 - n_ctx) with the shared prefix, n S without (S = seq_len)."""
        if self.share_prefix:
            return 1 + self.n_ctx + n_classes * (self.seq_len - 1 - self.n_ctx)
        return n_classes * self.seq_len

    def pass_flops(self, n_classes: int) -> float:
        """Approximate FLOPs of one forward (or one input-gradient backward) of one prompt over
        `n_classes` classes: 24 W^2 per row and layer (q, k, v, out and a 4W MLP)."""
        layers = len(getattr(self.transformer, "resblocks", ())) or 1
        return 24.0 * self.width**2 * layers * self.rows(n_classes)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        tokenizer: Callable[[list[str]], Tensor],
        classnames: Sequence[str],
        *,
        n_ctx: int,
        truncate: bool = True,
        share_prefix: bool = True,
        precision: Precision = "fp32",
    ) -> TextTower:
        """Tokenise "X X ... X {classname}." for every class and keep what the tower needs.

        truncate: run on the first max(EOT) + 1 positions (exact under the causal mask);
        share_prefix: run SOS + context once per prompt where the tower allows it (exact);
        precision: "fp32", or "bf16" autocast of the frozen tower (see the module docstring).
        """
        text = _text_module(model)
        pool = getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax"))
        if pool != "argmax" or getattr(text, "cls_emb", None) is not None:
            raise UsageError(
                f"backbone text tower pools with '{pool}'; prompt learning needs an EOT-pooled "
                "(argmax) CLIP text tower such as ViT-B-16 or RN50"
            )
        names = tuple(name.replace("_", " ") for name in classnames)
        prompts = [" ".join([PLACEHOLDER] * n_ctx) + " " + name + "." for name in names]
        device = text.token_embedding.weight.device
        tokens = tokenizer(prompts).to(device)  # [n_cls, L]
        eot = tokens.argmax(dim=-1)  # EOT has the largest id in CLIP's vocabulary
        context_length = tokens.shape[1]
        if int((tokens[:, -1] != 0).sum()) > 0 and int(eot.max()) == context_length - 1:
            longest = max(names, key=len)
            raise UsageError(
                f"n_ctx={n_ctx} plus class name '{longest}' exceeds the text context length "
                f"{context_length}; use a smaller --n-ctx"
            )
        seq_len = int(eot.max()) + 1 if truncate else context_length
        with torch.no_grad():
            embedding = text.token_embedding(tokens)  # [n_cls, L, W]
        mask = getattr(text, "attn_mask", None)
        causal = mask is not None and torch.equal(mask, causal_mask(mask.shape[0], mask.device))
        if not causal:
            seq_len = context_length  # cutting after EOT is exact only under a causal mask
        fast = causal and supports_fast_blocks(text.transformer)
        return cls(
            prefix=embedding[:, :1].clone(),
            suffix=embedding[:, 1 + n_ctx : seq_len].clone(),
            eot=eot,
            seq_len=seq_len,
            positional=text.positional_embedding.detach(),
            attn_mask=mask,
            transformer=text.transformer,
            ln_final=text.ln_final,
            projection=text.text_projection,
            token_embedding=text.token_embedding,
            tokenizer=tokenizer,
            classnames=names,
            n_ctx=n_ctx,
            logit_scale=float(model.logit_scale.exp()),
            share_prefix=share_prefix and fast,
            fast_blocks=fast,
            precision=precision,
            hand_backward=fast and tower_vjp.supported(text.transformer),
        )

    def with_options(
        self,
        *,
        share_prefix: bool | None = None,
        precision: Precision | None = None,
        hand_backward: bool | None = None,
    ) -> TextTower:
        """The same tower with other compute options (tensors are shared, not copied).
        hand_backward=True is honoured only where the tower supports it."""
        supported = self.fast_blocks and tower_vjp.supported(self.transformer)
        return replace(
            self,
            share_prefix=self.share_prefix
            if share_prefix is None
            else share_prefix and self.fast_blocks,
            precision=self.precision if precision is None else precision,
            hand_backward=self.hand_backward
            if hand_backward is None
            else hand_backward and supported,
        )

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast on `device` when precision is bf16; otherwise nothing."""
        if self.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _run(self, x: Tensor, eot: Tensor) -> Tensor:
        """Tower on embeddings x [N, S, W] (positional added here) -> features [N, D].

        S may be shorter than the context length: the causal mask makes the cut exact.
        """
        seq = x.shape[1]
        x = x + self.positional[:seq].to(x.dtype)
        mask = None if self.attn_mask is None else self.attn_mask[:seq, :seq]
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        return self._project(x)

    def encode(self, ctx: Tensor, class_idx: Tensor | None = None) -> Tensor:
        """Text features of learned prompts, L2-normalised.

        ctx: [*lead, n_ctx, W] context vectors shared by every class; the leading dims batch
             several prompts (clients, or a method's global and local prompt) in one forward.
        class_idx: [n] class ids to score (default: all classes).
        Returns [*lead, n, D].
        """
        prefix, suffix, eot = self.prefix, self.suffix, self.eot
        if class_idx is not None:
            prefix, suffix, eot = prefix[class_idx], suffix[class_idx], eot[class_idx]
        with self.autocast(ctx.device):
            if self.share_prefix and self.hand_backward and per_sample_backward_ahead():
                return tower_vjp.encode(self, ctx, suffix, eot)  # normalised, [*lead, n, D]
            if self.share_prefix:
                features = self._run_shared(ctx, suffix, eot)  # [*lead, n, D]
                return F.normalize(wide(features), dim=-1)
            n = prefix.shape[0]
            lead = ctx.shape[:-2]
            ctx = ctx.unsqueeze(-3).expand(*lead, n, *ctx.shape[-2:])
            x = torch.cat(
                [prefix.expand(*lead, *prefix.shape), ctx, suffix.expand(*lead, *suffix.shape)],
                dim=-2,
            )
            flat = x.reshape(-1, *x.shape[-2:])
            features = self._run(flat, eot.repeat(flat.shape[0] // n))
        return F.normalize(wide(features), dim=-1).reshape(*lead, n, -1)

    def encode_deep(self, ctx: Tensor, deeper: Tensor, class_idx: Tensor | None = None) -> Tensor:
        """Text features [n, D] (L2-normalised) of one prompt whose context is `ctx`
        [n_ctx, W] at the input and `deeper[i - 1]` [n_ctx, W] at the input of block i, for
        i = 1 .. len(deeper) (MaPLe's deep language prompts, Khattak et al. CVPR 2023: each
        replaces the previous block's outputs at the context positions). Runs every class's
        full sequence (no shared prefix: the deep context differs per block)."""
        prefix, suffix, eot = self.prefix, self.suffix, self.eot
        if class_idx is not None:
            prefix, suffix, eot = prefix[class_idx], suffix[class_idx], eot[class_idx]
        n, n_ctx = prefix.shape[0], ctx.shape[0]
        with self.autocast(ctx.device):
            x = torch.cat([prefix, ctx.expand(n, *ctx.shape), suffix], dim=1)  # [n, S, W]
            seq = x.shape[1]
            x = x + self.positional[:seq].to(x.dtype)
            mask = None if self.attn_mask is None else self.attn_mask[:seq, :seq]
            first = getattr(self.transformer, "batch_first", True)
            for i, block in enumerate(self.transformer.resblocks):
                if 1 <= i <= deeper.shape[0]:
                    deep = deeper[i - 1].to(x.dtype).expand(n, n_ctx, x.shape[-1])
                    x = torch.cat([x[:, :1], deep, x[:, 1 + n_ctx :]], dim=1)
                x = block(x if first else x.transpose(0, 1), attn_mask=mask)
                x = x if first else x.transpose(0, 1)
            x = self.ln_final(x)
            features = self._project(x[torch.arange(n, device=x.device), eot])
        return F.normalize(wide(features), dim=-1)

    def _run_shared(
        self, ctx: Tensor, suffix: Tensor, eot: Tensor, saved: list[Tensor] | None = None
    ) -> Tensor:
        """Projected EOT features [*lead, n, D] of ctx [*lead, n_ctx, W] by the shared-prefix
        path (module docstring); suffix [n, S_suffix, W] and eot [n] of the scored classes.
        `saved` receives what tower_vjp's backward reads (values are the same without it)."""
        n_pre = 1 + self.n_ctx
        seq = n_pre + suffix.shape[-2]
        lead = ctx.shape[:-2]
        pos = self.positional[:seq].to(ctx.dtype)
        sos = self.prefix[0].to(ctx.dtype)  # [1, W], the same for every class
        n_cls = suffix.shape[0]
        own = (suffix.to(ctx.dtype) + pos[n_pre:]).flatten(0, 1)  # [n S, W]
        x = torch.cat(
            [sos.expand(*lead, *sos.shape), ctx, own.expand(*lead, *own.shape)], dim=-2
        )  # [*lead, P + n S, W]
        x = x + torch.cat([pos[:n_pre], x.new_zeros(own.shape)])
        blocks = list(self.transformer.resblocks)
        for block in blocks[:-1]:
            x = shared_prefix_block(block, x, n_pre=n_pre, n_cls=n_cls, saved=saved)
        rows = last_block_eot(blocks[-1], x, n_pre=n_pre, eot=eot - n_pre, saved=saved)
        return self._project(_norm(self.ln_final, rows, saved))  # [*lead, n, D]

    def _project(self, x: Tensor) -> Tensor:
        if isinstance(self.projection, nn.Module):
            return self.projection(x)
        if self.projection is not None:
            return x @ self.projection.to(x.dtype)
        return x

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """Features [len(texts), D] of hand-written prompts, L2-normalised (zero-shot CLIP)."""
        tokens = self.tokenizer(list(texts)).to(self.positional.device)
        eot = tokens.argmax(dim=-1)
        seq = int(eot.max()) + 1
        with torch.no_grad(), self.autocast(self.positional.device):
            x = self.token_embedding(tokens[:, :seq])
            return F.normalize(wide(self._run(x, eot)), dim=-1)

    def embed_phrase(self, phrase: str) -> Tensor:
        """Token embeddings [n_words, W] of a phrase (CoOp's ctx_init), without SOS/EOT."""
        tokens = self.tokenizer([phrase])[0].to(self.positional.device)
        n = int(tokens.argmax()) - 1
        with torch.no_grad():
            return self.token_embedding(tokens[1 : 1 + n]).clone()


# -- the shared-prefix path: open_clip's ResidualAttentionBlock written out ----------------------


def causal_mask(size: int, device: torch.device | None = None) -> Tensor:
    """open_clip's additive causal mask [size, size]: -inf above the diagonal, 0 elsewhere."""
    return torch.full((size, size), float("-inf"), device=device).triu_(1)


def supports_fast_blocks(transformer: nn.Module) -> bool:
    """Whether every block is open_clip's standard `ResidualAttentionBlock`, batch first, with a
    plain nn.MultiheadAttention (packed in-projection, no extra k/v bias, no dropout)."""
    from open_clip.transformer import ResidualAttentionBlock

    blocks = getattr(transformer, "resblocks", None)
    if not getattr(transformer, "batch_first", False) or not blocks:
        return False
    for block in blocks:
        attn = getattr(block, "attn", None)
        ok = (
            type(block) is ResidualAttentionBlock
            and not hasattr(block, "ln_1_kv")
            and isinstance(attn, nn.MultiheadAttention)
            and attn._qkv_same_embed_dim
            and attn.bias_k is None
            and not attn.add_zero_attn
            and attn.dropout == 0.0
            and hasattr(block.mlp, "c_fc")
        )
        if not ok:
            return False
    return True


def gelu_parts(x: Tensor) -> tuple[Tensor, Tensor]:
    """(F.gelu(x) exact, its derivative Phi(x) + x phi(x)), both in x's dtype, computed in x's
    dtype widened to at least fp32 (bf16/fp16 in fp32, fp32 in fp32, fp64 in fp64)."""
    xf = wide(x.detach())
    cdf = torch.erf(xf * math.sqrt(0.5)).add_(1.0).mul_(0.5)  # Phi(x)
    slope = torch.exp(xf.square().mul_(-0.5)).mul_(xf).mul_(1.0 / math.sqrt(2.0 * math.pi))
    return (xf * cdf).to(x.dtype), slope.add_(cdf).to(x.dtype)


def exact_gelu(x: Tensor) -> Tensor:
    """F.gelu(x) (exact, erf form), with its derivative Phi(x) + x phi(x) computed in the
    forward so that the backward is one multiply by it (cheap to repeat per sample under vmap,
    where GELU's own backward re-evaluates erf and exp B times).

    The value x Phi(x) is detached and the gradient enters as (x - x.detach()) * slope, which
    adds an exact zero to the value and has gradient slope, the exact derivative (plain ops, so
    vmap and vjp add no autograd.Function overhead).
    """
    value, slope = gelu_parts(x)
    return value + (x - x.detach()) * slope


def activation_slope(module: nn.Module, x: Tensor) -> Tensor | None:
    """The derivative of an MLP activation at x for the towers' activations (exact and tanh
    GELU, open_clip's QuickGELU x sigmoid(1.702 x)); None for any other module."""
    from open_clip.transformer import QuickGELU

    xf = wide(x.detach())
    if isinstance(module, nn.GELU) and module.approximate == "none":
        return gelu_parts(x)[1]
    if isinstance(module, nn.GELU) and module.approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        t = torch.tanh(c * (xf + 0.044715 * xf**3))
        slope = 0.5 * (1 + t) + 0.5 * xf * (1 - t * t) * c * (1 + 3 * 0.044715 * xf * xf)
        return slope.to(x.dtype)
    if type(module) is QuickGELU:
        s = torch.sigmoid(1.702 * xf)
        return (s + 1.702 * xf * s * (1 - s)).to(x.dtype)
    return None


def _activation(module: nn.Module, x: Tensor) -> Tensor:
    if isinstance(module, nn.GELU) and module.approximate == "none":
        return exact_gelu(x)
    return module(x)


def _mlp(block: nn.Module, x: Tensor, saved: list[Tensor] | None = None) -> Tensor:
    mlp = block.mlp
    pre = F.linear(x, mlp.c_fc.weight, mlp.c_fc.bias)
    if saved is None:
        hidden = _activation(mlp.gelu, pre)
    elif isinstance(mlp.gelu, nn.GELU) and mlp.gelu.approximate == "none":
        # inside tower_vjp's forward nothing is differentiated: the value and the slope
        # from one evaluation of erf and exp (exact_gelu's value is the same tensor)
        hidden, slope = gelu_parts(pre)
        saved.append(slope)
    else:
        slope = activation_slope(mlp.gelu, pre)
        assert slope is not None  # tower_vjp.supported checked the activation
        saved.append(slope)
        hidden = _activation(mlp.gelu, pre)
    return F.linear(hidden, mlp.c_proj.weight, mlp.c_proj.bias)


def _norm(ln: nn.Module, x: Tensor, saved: list[Tensor] | None) -> Tensor:
    """ln(x); with `saved`, also keeps (x_hat, 1 / std) in fp32 for the hand-written backward."""
    if saved is not None:
        xf = wide(x.detach())
        var, mean = torch.var_mean(xf, dim=-1, keepdim=True, correction=0)
        rstd = torch.rsqrt(var + ln.eps)
        saved += [(xf - mean) * rstd, rstd]
    return ln(x)


# Below this many positions per class the attention among a class's own positions is computed
# elementwise (broadcast multiply and sum) rather than by a batch of tiny matmuls.
_ELEMENTWISE_MAX = 8


def _in_proj(attn: nn.MultiheadAttention, x: Tensor, part: slice) -> Tensor:
    """Rows `part` of the packed q/k/v projection applied to x."""
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[part]
    return F.linear(x, attn.in_proj_weight[part], bias)


def _heads(x: Tensor, heads: int) -> Tensor:
    """[..., R, W] -> [..., H, R, W / H]."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def _pair_scores(q: Tensor, k: Tensor) -> Tensor:
    """q [..., Q, hd] . k [..., S, hd] -> [..., Q, S]."""
    if q.shape[-2] * k.shape[-2] <= _ELEMENTWISE_MAX**2:
        return (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1)
    return q @ k.transpose(-1, -2)


def _pair_mix(p: Tensor, v: Tensor) -> Tensor:
    """p [..., Q, S] @ v [..., S, hd] -> [..., Q, hd]."""
    if p.shape[-2] * p.shape[-1] <= _ELEMENTWISE_MAX**2:
        return (p.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)
    return p @ v


def _class_attention(
    q: Tensor,
    k_pre: Tensor,
    v_pre: Tensor,
    k_suf: Tensor,
    v_suf: Tensor,
    mask: Tensor,
    saved: list[Tensor] | None = None,
) -> Tensor:
    """Class-specific queries over the shared prefix keys (all visible) and their own class's
    keys (additive `mask`).

    q [..., H, n, Q, hd] (scaled); k_pre, v_pre [..., H, P, hd]; k_suf, v_suf [..., H, n, S, hd];
    mask broadcastable to [..., H, n, Q, S]. Returns [..., H, n, Q, hd].
    """
    n, rows = q.shape[-3], q.shape[-2]
    to_pre = (q.flatten(-3, -2) @ k_pre.transpose(-1, -2)).unflatten(-2, (n, rows))
    to_suf = _pair_scores(q, k_suf) + mask  # [..., H, n, Q, S]
    probs = torch.softmax(torch.cat([to_pre, to_suf], dim=-1), dim=-1)
    p_pre, p_suf = probs.split([k_pre.shape[-2], k_suf.shape[-2]], dim=-1)
    if saved is not None:
        saved += [p_pre, p_suf]
    from_pre = (p_pre.flatten(-3, -2) @ v_pre).unflatten(-2, (n, rows))
    return from_pre + _pair_mix(p_suf, v_suf)


def shared_prefix_block(
    block: nn.Module, x: Tensor, *, n_pre: int, n_cls: int, saved: list[Tensor] | None = None
) -> Tensor:
    """One open_clip ResidualAttentionBlock on rows x [..., P + n S, W]: the P prefix rows shared
    by every class, then each class's S own rows (positions P .. P + S - 1), class-major.

    Equal to the block on the full sequences [..., n, P + S, W] under the causal mask: prefix
    rows attend causally among themselves; a class's rows attend to every prefix row and
    causally to that class's own rows. Layer norms, projections and MLP run on all rows at once.
    `saved`: a list that receives what `tower_vjp._block_back` reads (the values returned
    are the same with or without it).
    """
    attn, heads = block.attn, block.attn.num_heads
    width = x.shape[-1]
    n_suf = (x.shape[-2] - n_pre) // n_cls
    qkv = _heads(_in_proj(attn, _norm(block.ln_1, x, saved), slice(None)), 3 * heads)
    q, k, v = qkv.chunk(3, dim=-3)  # [..., H, R, hd]
    q = q * (width // heads) ** -0.5
    (q_pre, q_suf), (k_pre, k_suf), (v_pre, v_suf) = (
        t.split([n_pre, n_cls * n_suf], dim=-2) for t in (q, k, v)
    )  # split, not two slices: its backward is one concatenation, not two zero-filled copies
    mask_pre = causal_mask(n_pre, x.device).to(q.dtype)
    scores = q_pre @ k_pre.transpose(-1, -2) + mask_pre
    probs_pre = torch.softmax(scores, dim=-1)
    if saved is not None:
        saved += [q, k, v, probs_pre]
    out_pre = probs_pre @ v_pre  # [..., H, P, hd]
    out_suf = _class_attention(
        q_suf.unflatten(-2, (n_cls, n_suf)),
        k_pre,
        v_pre,
        k_suf.unflatten(-2, (n_cls, n_suf)),
        v_suf.unflatten(-2, (n_cls, n_suf)),
        causal_mask(n_suf, x.device).to(q.dtype),
        saved,
    ).flatten(-3, -2)  # [..., H, n S, hd]
    out = torch.cat([out_pre, out_suf], dim=-2).transpose(-3, -2).flatten(-2)  # [..., R, W]
    x = x + block.ls_1(F.linear(out, attn.out_proj.weight, attn.out_proj.bias))
    return x + block.ls_2(_mlp(block, _norm(block.ln_2, x, saved), saved))


def last_block_eot(
    block: nn.Module, x: Tensor, *, n_pre: int, eot: Tensor, saved: list[Tensor] | None = None
) -> Tensor:
    """The last block's output at each class's EOT row only: [..., n, W].

    x [..., P + n S, W] as in `shared_prefix_block`; eot [n] EOT positions within the classes'
    own rows. Every row gives keys and values; queries, attention output and MLP run for the n
    EOT rows only. `saved` as in `shared_prefix_block`.
    """
    attn, heads = block.attn, block.attn.num_heads
    width = x.shape[-1]
    n_cls = eot.shape[0]
    n_suf = (x.shape[-2] - n_pre) // n_cls
    h = _norm(block.ln_1, x, saved)
    k, v = _heads(_in_proj(attn, h, slice(width, None)), 2 * heads).chunk(2, dim=-3)
    eot_rows = n_pre + torch.arange(n_cls, device=x.device) * n_suf + eot  # [n]
    q = _in_proj(attn, h[..., eot_rows, :], slice(0, width)) * (width // heads) ** -0.5
    q = _heads(q, heads).unsqueeze(-2)  # [..., H, n, 1, hd]
    visible = torch.arange(n_suf, device=x.device) <= eot.unsqueeze(-1)  # [n, S]
    mask = torch.zeros(visible.shape, dtype=q.dtype, device=x.device)
    mask = mask.masked_fill_(~visible, float("-inf")).unsqueeze(-2)  # [n, 1, S]
    if saved is not None:
        saved += [q, k, v]
    (k_pre, k_suf), (v_pre, v_suf) = (t.split([n_pre, n_cls * n_suf], dim=-2) for t in (k, v))
    out = _class_attention(
        q,
        k_pre,
        v_pre,
        k_suf.unflatten(-2, (n_cls, n_suf)),
        v_suf.unflatten(-2, (n_cls, n_suf)),
        mask,
        saved,
    )  # [..., H, n, 1, hd]
    out = out.squeeze(-2).transpose(-3, -2).flatten(-2)  # [..., n, W]
    y = x[..., eot_rows, :] + block.ls_1(F.linear(out, attn.out_proj.weight, attn.out_proj.bias))
    return y + block.ls_2(_mlp(block, _norm(block.ln_2, y, saved), saved))
