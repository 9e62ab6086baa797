"""The shared-prefix forward: open_clip's ResidualAttentionBlock written out, prefix run once.

The first 1 + n_ctx positions of every class prompt (SOS and the context vectors) are the same
for every class, and under the causal mask so are their hidden states in every layer. The
forward therefore runs them once per prompt, as a prefix stream [*lead, 1 + n_ctx, W], and runs
only the class-specific positions per class, as a suffix stream [*lead, n, S - 1 - n_ctx, W]
(flattened class-major to rows [*lead, P + n S, W]) whose queries attend to the prefix's keys
and values and causally to their own. In the last layer only the EOT rows are computed
(queries, MLP), and the prefix only gives keys and values. On the embedded default (16 context
vectors, EOT at 20) a per-sample backward then touches 17 + 32 x 4 rows per layer instead of
32 x 21. The path is taken when every block is open_clip's standard `ResidualAttentionBlock`
(nn.MultiheadAttention) under its causal mask (`supports_fast_blocks`); tests/test_speed.py
checks equality with the module path.

Saving for the hand-written backward (backward.py): `features_saving` runs the same ops and
also returns, per block, what the input-gradient backward reads, as named tuples
(`BlockSaved`, `LastBlockSaved`, `FinalSaved`, gathered in `TowerSaved`): the layer norms'
normalised inputs and inverse stds (fp32), the scaled queries, keys, values, the attention
probabilities, and the MLP activation's derivative. The values returned are the same with or
without saving.

Exact GELU is kept (never swapped for the tanh form): its derivative is computed once in the
forward and the backward is one multiply, which a per-sample (vmapped) backward repeats B times
instead of re-evaluating erf and exp.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fpl_bench.compute import wide

if TYPE_CHECKING:
    from fpl_bench.text_tower.tower import TextTower


# -- what the forward saves for the hand-written backward ---------------------------------------
#
# Shapes for one stack of prompts [*lead]: R = P + n S rows (P = 1 + n_ctx prefix rows, n classes
# of S own rows each), H heads of width hd, W the width, D the feature width.


class BlockSaved(NamedTuple):
    """What `shared_prefix_block` keeps for `backward._block_back`."""

    x_hat1: Tensor  # ln_1's normalised input [*lead, R, W] (fp32)
    rstd1: Tensor  # ln_1's 1 / std [*lead, R, 1]
    q: Tensor  # scaled queries [*lead, H, R, hd]
    k: Tensor  # keys [*lead, H, R, hd]
    v: Tensor  # values [*lead, H, R, hd]
    probs_pre: Tensor  # the prefix rows' causal attention [*lead, H, P, P]
    p_pre: Tensor  # the class rows' attention to the prefix [*lead, H, n, S, P]
    p_suf: Tensor  # ... and to their own class's rows [*lead, H, n, S, S]
    x_hat2: Tensor  # ln_2's normalised input [*lead, R, W]
    rstd2: Tensor  # [*lead, R, 1]
    slope: Tensor  # the MLP activation's derivative at its input [*lead, R, 4W]


class LastBlockSaved(NamedTuple):
    """What `last_block_eot` keeps for `backward._last_block_back` (queries, attention and MLP
    for the n EOT rows only)."""

    x_hat1: Tensor  # [*lead, R, W]
    rstd1: Tensor  # [*lead, R, 1]
    q: Tensor  # the EOT rows' scaled queries [*lead, H, n, 1, hd]
    k: Tensor  # [*lead, H, R, hd]
    v: Tensor  # [*lead, H, R, hd]
    p_pre: Tensor  # [*lead, H, n, 1, P]
    p_suf: Tensor  # [*lead, H, n, 1, S]
    x_hat2: Tensor  # [*lead, n, W]
    rstd2: Tensor  # [*lead, n, 1]
    slope: Tensor  # [*lead, n, 4W]


class FinalSaved(NamedTuple):
    """ln_final on the EOT rows, and the L2 normalisation of the projected features."""

    x_hat: Tensor  # ln_final's normalised input [*lead, n, W]
    rstd: Tensor  # [*lead, n, 1]
    z: Tensor  # the normalised features [*lead, n, D]
    norm: Tensor  # the features' norm before normalisation [*lead, n, 1]


class TowerSaved(NamedTuple):
    """Everything the hand-written backward reads, for one forward of a stack of prompts."""

    blocks: tuple[BlockSaved, ...]  # every block but the last, first to last
    last: LastBlockSaved
    final: FinalSaved

    @property
    def lead(self) -> torch.Size:
        """The leading (prompt) dimensions the forward ran with."""
        return self.final.norm.shape[:-2]

    def flatten(self) -> tuple[Tensor, ...]:
        """The tensors in one flat tuple (blocks, last block, final), for an autograd.Function
        boundary; `unflatten` inverts it."""
        return (*(t for block in self.blocks for t in block), *self.last, *self.final)

    @classmethod
    def unflatten(cls, flat: Sequence[Tensor]) -> TowerSaved:
        """Inverse of `flatten`: the number of blocks follows from the length."""
        per_block, per_last = len(BlockSaved._fields), len(LastBlockSaved._fields)
        n_full, rest = divmod(len(flat) - per_last - len(FinalSaved._fields), per_block)
        if n_full < 0 or rest:
            raise ValueError(f"{len(flat)} tensors are not a flattened TowerSaved")
        edge = n_full * per_block
        blocks = tuple(BlockSaved(*flat[i : i + per_block]) for i in range(0, edge, per_block))
        last = LastBlockSaved(*flat[edge : edge + per_last])
        return cls(blocks, last, FinalSaved(*flat[edge + per_last :]))

    def map(self, fn: Callable[[Tensor], Tensor]) -> TowerSaved:
        """The same structure with `fn` applied to every tensor."""
        return TowerSaved.unflatten([fn(t) for t in self.flatten()])


# -- the tower on the shared-prefix rows ---------------------------------------------------------


def features(
    tower: TextTower, ctx: Tensor, suffix: Tensor, eot: Tensor, deeper: Tensor | None = None
) -> Tensor:
    """Projected EOT features [*lead, n, D] of ctx [*lead, n_ctx, W] by the shared-prefix path;
    suffix [n, S_suffix, W] and eot [n] (positions in the full sequence) of the scored classes.
    deeper [*lead, J - 1, n_ctx, W]: deep prompts (MaPLe, IVLP), deeper[i - 1] replacing the
    context rows at the input of block i (`_run`). Differentiable by autograd."""
    return _run(tower, ctx, suffix, eot, save=False, deeper=deeper)[0]


def features_saving(
    tower: TextTower, ctx: Tensor, suffix: Tensor, eot: Tensor, deeper: Tensor | None = None
) -> tuple[Tensor, TowerSaved]:
    """L2-normalised `features` (the values of F.normalize(wide(features))) and what the
    hand-written backward reads. Nothing here is differentiated (backward.py's Function)."""
    feats, saved = _run(tower, ctx, suffix, eot, save=True, deeper=deeper)
    assert saved is not None
    blocks, last, (x_hat, rstd) = saved
    flat = wide(feats)
    norm = flat.norm(dim=-1, keepdim=True)
    z = F.normalize(flat, dim=-1)
    return z, TowerSaved(blocks, last, FinalSaved(x_hat, rstd, z, norm))


_Parts = tuple[tuple[BlockSaved, ...], LastBlockSaved, tuple[Tensor, Tensor]]


def deep_blocks(deeper: Tensor | None) -> int:
    """How many blocks after the first take a deep prompt: J - 1 (0 without deep prompts)."""
    return 0 if deeper is None else deeper.shape[-3]


def replace_context(x: Tensor, deep: Tensor, n_pre: int) -> Tensor:
    """x [..., R, W] with its context rows 1 .. n_pre - 1 replaced by deep [..., n_ctx, W]
    (MaPLe's deep language prompt at a block's input, Khattak et al. CVPR 2023, Sec. 3.2: the
    previous block's outputs at the context positions are discarded). Every class shares the
    context rows, so in the shared-prefix layout they are replaced once, in the prefix."""
    return torch.cat([x[..., :1, :], deep.to(x.dtype), x[..., n_pre:, :]], dim=-2)


def _run(
    tower: TextTower,
    ctx: Tensor,
    suffix: Tensor,
    eot: Tensor,
    *,
    save: bool,
    deeper: Tensor | None = None,
) -> tuple[Tensor, _Parts | None]:
    """The projected features and, with `save`, the blocks' saved tensors and ln_final's
    (x_hat, 1 / std). With `deeper`, deeper[..., i - 1, :, :] replaces the context rows at the
    input of block i = 1 .. J - 1 (no positional embedding is added to them, as in
    `TextTower.encode_deep`)."""
    n_pre = 1 + tower.n_ctx
    seq = n_pre + suffix.shape[-2]
    lead = ctx.shape[:-2]
    pos = tower.positional[:seq].to(ctx.dtype)
    sos = tower.prefix[0].to(ctx.dtype)  # [1, W], the same for every class
    n_cls = suffix.shape[0]
    own = (suffix.to(ctx.dtype) + pos[n_pre:]).flatten(0, 1)  # [n S, W]
    x = torch.cat(
        [sos.expand(*lead, *sos.shape), ctx, own.expand(*lead, *own.shape)], dim=-2
    )  # [*lead, P + n S, W]
    x = x + torch.cat([pos[:n_pre], x.new_zeros(own.shape)])
    resblocks = list(tower.transformer.resblocks)
    n_deep = deep_blocks(deeper)
    blocks = []
    for i, block in enumerate(resblocks):
        if deeper is not None and 1 <= i <= n_deep:
            x = replace_context(x, deeper[..., i - 1, :, :], n_pre)
        if i == len(resblocks) - 1:
            break
        x, kept = shared_prefix_block(block, x, n_pre=n_pre, n_cls=n_cls, save=save)
        if kept is not None:
            blocks.append(kept)
    rows, last = last_block_eot(resblocks[-1], x, n_pre=n_pre, eot=eot - n_pre, save=save)
    stats = _norm_stats(tower.ln_final, rows) if save else None
    feats = tower.project(tower.ln_final(rows))  # [*lead, n, D]
    if last is None or stats is None:
        return feats, None
    return feats, (tuple(blocks), last, stats)


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


def _gelu_cdf(xf: Tensor) -> Tensor:
    """Phi(x) = (1 + erf(x / sqrt 2)) / 2, on x already widened (`wide`)."""
    return torch.erf(xf * math.sqrt(0.5)).add_(1.0).mul_(0.5)


def gelu_parts(x: Tensor) -> tuple[Tensor, Tensor]:
    """(F.gelu(x) exact, its derivative Phi(x) + x phi(x)), both in x's dtype, computed in x's
    dtype widened to at least fp32 (bf16/fp16 in fp32, fp32 in fp32, fp64 in fp64)."""
    xf = wide(x.detach())
    cdf = _gelu_cdf(xf)
    slope = torch.exp(xf.square().mul_(-0.5)).mul_(xf).mul_(1.0 / math.sqrt(2.0 * math.pi))
    return (xf * cdf).to(x.dtype), slope.add_(cdf).to(x.dtype)


def exact_gelu(x: Tensor) -> Tensor:
    """F.gelu(x) (exact, erf form), with its derivative Phi(x) + x phi(x) computed in the
    forward so that the backward is one multiply by it (cheap to repeat per sample under vmap,
    where GELU's own backward re-evaluates erf and exp B times).

    The value x Phi(x) is detached and the gradient enters as (x - x.detach()) * slope, which
    adds an exact zero to the value and has gradient slope, the exact derivative (plain ops, so
    vmap and vjp add no autograd.Function overhead). With gradients off (evaluation) only the
    value is computed: the same tensor, without the slope's exp and multiplies.
    """
    if not torch.is_grad_enabled():
        xf = wide(x)
        return (xf * _gelu_cdf(xf)).to(x.dtype)
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


def _mlp(block: nn.Module, x: Tensor, *, save: bool) -> tuple[Tensor, Tensor | None]:
    """The block's MLP on x, and with `save` its activation's derivative at its input."""
    mlp = block.mlp
    pre = F.linear(x, mlp.c_fc.weight, mlp.c_fc.bias)
    slope = None
    if not save:
        hidden = _activation(mlp.gelu, pre)
    elif isinstance(mlp.gelu, nn.GELU) and mlp.gelu.approximate == "none":
        # inside backward.py's forward nothing is differentiated: the value and the slope
        # from one evaluation of erf and exp (exact_gelu's value is the same tensor)
        hidden, slope = gelu_parts(pre)
    else:
        slope = activation_slope(mlp.gelu, pre)
        assert slope is not None  # backward.supported checked the activation
        hidden = _activation(mlp.gelu, pre)
    return F.linear(hidden, mlp.c_proj.weight, mlp.c_proj.bias), slope


def _mlp_residual(
    block: nn.Module, x: Tensor, *, save: bool
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """The block's second half, x + ls_2 MLP(ln_2(x)), and with `save` what its backward reads:
    ln_2's (x_hat, 1 / std) and the activation's derivative."""
    norm = _norm_stats(block.ln_2, x) if save else None
    mlp, slope = _mlp(block, block.ln_2(x), save=save)
    y = x + block.ls_2(mlp)
    if norm is None or slope is None:
        return y, None
    return y, (*norm, slope)


def _norm_stats(ln: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(x_hat, 1 / std) of layer norm `ln` at x, in fp32 (or wider), for the backward."""
    xf = wide(x.detach())
    var, mean = torch.var_mean(xf, dim=-1, keepdim=True, correction=0)
    rstd = torch.rsqrt(var + ln.eps)
    return (xf - mean) * rstd, rstd


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
    q: Tensor, k_pre: Tensor, v_pre: Tensor, k_suf: Tensor, v_suf: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Class-specific queries over the shared prefix keys (all visible) and their own class's
    keys (additive `mask`).

    q [..., H, n, Q, hd] (scaled); k_pre, v_pre [..., H, P, hd]; k_suf, v_suf [..., H, n, S, hd];
    mask broadcastable to [..., H, n, Q, S]. Returns the output [..., H, n, Q, hd] and the
    attention probabilities to the prefix [..., H, n, Q, P] and to the class's own rows
    [..., H, n, Q, S].
    """
    n, rows = q.shape[-3], q.shape[-2]
    to_pre = (q.flatten(-3, -2) @ k_pre.transpose(-1, -2)).unflatten(-2, (n, rows))
    to_suf = _pair_scores(q, k_suf) + mask  # [..., H, n, Q, S]
    probs = torch.softmax(torch.cat([to_pre, to_suf], dim=-1), dim=-1)
    p_pre, p_suf = probs.split([k_pre.shape[-2], k_suf.shape[-2]], dim=-1)
    from_pre = (p_pre.flatten(-3, -2) @ v_pre).unflatten(-2, (n, rows))
    return from_pre + _pair_mix(p_suf, v_suf), p_pre, p_suf


def shared_prefix_block(
    block: nn.Module, x: Tensor, *, n_pre: int, n_cls: int, save: bool = False
) -> tuple[Tensor, BlockSaved | None]:
    """One open_clip ResidualAttentionBlock on rows x [..., P + n S, W]: the P prefix rows shared
    by every class, then each class's S own rows (positions P .. P + S - 1), class-major.

    Equal to the block on the full sequences [..., n, P + S, W] under the causal mask: prefix
    rows attend causally among themselves; a class's rows attend to every prefix row and
    causally to that class's own rows. Layer norms, projections and MLP run on all rows at once.
    Returns the block's output and, with `save`, what the hand-written backward reads (None
    without; the output is the same either way).
    """
    attn, heads = block.attn, block.attn.num_heads
    width = x.shape[-1]
    n_suf = (x.shape[-2] - n_pre) // n_cls
    norm1 = _norm_stats(block.ln_1, x) if save else None
    qkv = _heads(_in_proj(attn, block.ln_1(x), slice(None)), 3 * heads)
    q, k, v = qkv.chunk(3, dim=-3)  # [..., H, R, hd]
    q = q * (width // heads) ** -0.5
    (q_pre, q_suf), (k_pre, k_suf), (v_pre, v_suf) = (
        t.split([n_pre, n_cls * n_suf], dim=-2) for t in (q, k, v)
    )  # split, not two slices: its backward is one concatenation, not two zero-filled copies
    mask_pre = causal_mask(n_pre, x.device).to(q.dtype)
    scores = q_pre @ k_pre.transpose(-1, -2) + mask_pre
    probs_pre = torch.softmax(scores, dim=-1)
    out_pre = probs_pre @ v_pre  # [..., H, P, hd]
    out_suf, p_pre, p_suf = _class_attention(
        q_suf.unflatten(-2, (n_cls, n_suf)),
        k_pre,
        v_pre,
        k_suf.unflatten(-2, (n_cls, n_suf)),
        v_suf.unflatten(-2, (n_cls, n_suf)),
        causal_mask(n_suf, x.device).to(q.dtype),
    )
    out_suf = out_suf.flatten(-3, -2)  # [..., H, n S, hd]
    out = torch.cat([out_pre, out_suf], dim=-2).transpose(-3, -2).flatten(-2)  # [..., R, W]
    x = x + block.ls_1(F.linear(out, attn.out_proj.weight, attn.out_proj.bias))
    y, kept = _mlp_residual(block, x, save=save)
    if norm1 is None or kept is None:
        return y, None
    return y, BlockSaved(*norm1, q, k, v, probs_pre, p_pre, p_suf, *kept)


def last_block_eot(
    block: nn.Module, x: Tensor, *, n_pre: int, eot: Tensor, save: bool = False
) -> tuple[Tensor, LastBlockSaved | None]:
    """The last block's output at each class's EOT row only: [..., n, W].

    x [..., P + n S, W] as in `shared_prefix_block`; eot [n] EOT positions within the classes'
    own rows. Every row gives keys and values; queries, attention output and MLP run for the n
    EOT rows only. `save` as in `shared_prefix_block`.
    """
    attn, heads = block.attn, block.attn.num_heads
    width = x.shape[-1]
    n_cls = eot.shape[0]
    n_suf = (x.shape[-2] - n_pre) // n_cls
    norm1 = _norm_stats(block.ln_1, x) if save else None
    h = block.ln_1(x)
    k, v = _heads(_in_proj(attn, h, slice(width, None)), 2 * heads).chunk(2, dim=-3)
    eot_rows = n_pre + torch.arange(n_cls, device=x.device) * n_suf + eot  # [n]
    q = _in_proj(attn, h[..., eot_rows, :], slice(0, width)) * (width // heads) ** -0.5
    q = _heads(q, heads).unsqueeze(-2)  # [..., H, n, 1, hd]
    visible = torch.arange(n_suf, device=x.device) <= eot.unsqueeze(-1)  # [n, S]
    mask = torch.zeros(visible.shape, dtype=q.dtype, device=x.device)
    mask = mask.masked_fill_(~visible, float("-inf")).unsqueeze(-2)  # [n, 1, S]
    (k_pre, k_suf), (v_pre, v_suf) = (t.split([n_pre, n_cls * n_suf], dim=-2) for t in (k, v))
    out, p_pre, p_suf = _class_attention(
        q,
        k_pre,
        v_pre,
        k_suf.unflatten(-2, (n_cls, n_suf)),
        v_suf.unflatten(-2, (n_cls, n_suf)),
        mask,
    )  # [..., H, n, 1, hd]
    out = out.squeeze(-2).transpose(-3, -2).flatten(-2)  # [..., n, W]
    y = x[..., eot_rows, :] + block.ls_1(F.linear(out, attn.out_proj.weight, attn.out_proj.bias))
    z, kept = _mlp_residual(block, y, save=save)
    if norm1 is None or kept is None:
        return z, None
    return z, LastBlockSaved(*norm1, q, k, v, p_pre, p_suf, *kept)
