"""The shared-prefix text tower as one autograd node with a hand-written, sample-batched backward.

A private step needs B per-sample gradients of the prompt, i.e. B backward passes of the frozen
text tower from B cotangents on the class features, all at the same forward point
(privacy/per_sample.py). Under `vmap` autograd replays the tower's ~100 small backward ops with
a batch dimension, moving it around between ops; on a CPU most of that time went to copies and
broadcast reductions, not to the matmuls. Here the tower's forward saves what its input-gradient
backward needs (normalised layer-norm inputs, attention probabilities, the MLP activation's
derivative) and the backward is written out, for cotangents with any number of leading batch
dimensions: the B samples become leading rows of every matmul against the frozen weights.

Per block (open_clip's ResidualAttentionBlock on the shared-prefix rows, shared_prefix.py), with
the weights frozen, only input gradients are formed:

    y = x1 + ls2 MLP(LN2(x1)),  x1 = x + ls1 Attn(LN1(x))
    dx1 = dy + LN2^T( W_fc^T (act'(a) * W_proj^T ls2 dy) )
    dx  = dx1 + LN1^T( W_in^T [dq, dk, dv] ),   from dO = W_out^T ls1 dx1
    LN^T(g) = rstd (g w - mean(g w) - x_hat mean(g w x_hat))
    softmax: dS = P * (dP - sum_j dP_j P_j),  dq = dS k,  dk = dS^T q,  dv = P^T dO

(q scaled by hd^-1/2 as in the forward.) The last block and the final layer norm run on the EOT
rows only, as the forward does; the features' L2 normalisation is differentiated too.

What the forward saves is named (shared_prefix.py: `BlockSaved`, `LastBlockSaved`, `FinalSaved`
in a `TowerSaved`); it is flattened to a tuple only at the autograd.Function boundary, where
torch.func needs plain tensors, and unflattened as the backward starts.

How it plugs into torch.func: `SharedPrefixEncode` is an autograd.Function whose backward calls
`_Backward.apply`; both have a `vmap` rule that folds the vmapped dimension into the leading
dimensions the code already handles (a stack of prompts, a stack of samples), so
`vmap(vjp_fn)(cotangents)` runs the batched backward once rather than op by op. Values equal
autograd's to float rounding (tests/test_tower_vjp.py, fp64). Used only when every block is
supported (`supported`); `TextTower(hand_backward=False)` keeps autograd (for comparison).
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from fpl_bench.text_tower.shared_prefix import (
    BlockSaved,
    LastBlockSaved,
    TowerSaved,
    deep_blocks,
    features_saving,
)

if TYPE_CHECKING:
    from fpl_bench.text_tower.tower import TextTower

__all__ = ["CPU_ROWS_PER_CALL", "SharedPrefixEncode", "encode", "supported", "tower_backward"]


def supported(transformer: nn.Module) -> bool:
    """Whether the hand-written backward covers every block: layer scales that are identities
    or open_clip's LayerScale, affine layer norms, and an MLP activation with a known derivative
    (exact or tanh GELU, QuickGELU). The shared-prefix path itself needs `fast_blocks`."""
    from open_clip.transformer import LayerScale, QuickGELU

    for block in getattr(transformer, "resblocks", ()):
        for ls in (block.ls_1, block.ls_2):
            if not isinstance(ls, nn.Identity | LayerScale):
                return False
        for ln in (block.ln_1, block.ln_2):
            if not isinstance(ln, nn.LayerNorm) or ln.weight is None or ln.bias is None:
                return False
        act = block.mlp.gelu
        if not (isinstance(act, nn.GELU) or type(act) is QuickGELU):
            return False
    return True


@dataclass(frozen=True, eq=False)
class _Spec:
    """What the backward needs besides saved tensors: the tower and the scored classes."""

    tower: TextTower
    suffix: Tensor  # [n, S, W]
    eot: Tensor  # [n] EOT positions in the full sequence
    n_deep: int = 0  # blocks 1 .. n_deep take a deep prompt (shared_prefix.replace_context)


def encode(
    tower: TextTower, ctx: Tensor, suffix: Tensor, eot: Tensor, deeper: Tensor | None = None
) -> Tensor:
    """L2-normalised EOT features [*lead, n, D] of ctx [*lead, n_ctx, W] (and the deep prompts
    deeper [*lead, J - 1, n_ctx, W]), as `shared_prefix.features` + normalisation, with the
    hand-written backward."""
    spec = _Spec(tower, suffix, eot, deep_blocks(deeper))
    return SharedPrefixEncode.apply(ctx, deeper, spec)[0]


class SharedPrefixEncode(torch.autograd.Function):
    """features = normalize(tower(ctx, deeper)); outputs (features, *saved.flatten()) with the
    saved tensors marked non-differentiable (a torch.func-compatible Function cannot keep them
    on ctx)."""

    @staticmethod
    def forward(ctx_vectors: Tensor, deeper: Tensor | None, spec: _Spec) -> tuple[Tensor, ...]:
        z, saved = features_saving(spec.tower, ctx_vectors, spec.suffix, spec.eot, deeper)
        # the differentiable output must not be one of the saved (non-differentiable) tensors
        return (z.clone(), *saved.flatten())

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        ctx.spec = inputs[2]
        ctx.ctx_dtype = inputs[0].dtype
        ctx.n_ctx = inputs[0].shape[-2]
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(*output[1:])

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *_: Any) -> tuple[Tensor | None, Tensor | None, None]:
        d = _Backward.apply(grad, ctx.spec, *ctx.saved_tensors)  # [..., J n_ctx, W]
        d = d.to(ctx.ctx_dtype)
        if not ctx.spec.n_deep:
            return d, None, None
        dctx, ddeep = d.split([ctx.n_ctx, d.shape[-2] - ctx.n_ctx], dim=-2)
        return dctx, ddeep.unflatten(-2, (ctx.spec.n_deep, ctx.n_ctx)), None

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[Any, ...], ctx_vectors: Tensor, deeper: Tensor | None, spec: _Spec
    ) -> Any:
        ctx_vectors = _front(ctx_vectors, in_dims[0], info)
        deeper = None if deeper is None else _front(deeper, in_dims[1], info)
        outputs = SharedPrefixEncode.apply(ctx_vectors, deeper, spec)
        return outputs, tuple(0 for _ in outputs)


class _Backward(torch.autograd.Function):
    """d features -> d ctx, for cotangents [*extra, *lead, n, D] against tensors saved for
    [*lead]. Not differentiable itself (no double backward)."""

    @staticmethod
    def forward(grad: Tensor, spec: _Spec, *flat_saved: Tensor) -> Tensor:
        saved = TowerSaved.unflatten(flat_saved)
        extra = grad.shape[: grad.dim() - len(saved.lead) - 2]
        flat = grad.reshape(-1, *grad.shape[len(extra) :])  # [E, *lead, n, D]
        with spec.tower.autocast(grad.device):
            dctx = tower_backward(spec, saved, flat)
        return dctx.reshape(*extra, *dctx.shape[1:])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise NotImplementedError("the hand-written tower backward is not differentiable")

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], grad: Tensor, spec: _Spec, *saved: Tensor) -> Any:
        saved_dims = in_dims[2:]
        if all(d is None for d in saved_dims):  # per-sample cotangents: a new extra dim
            return _Backward.apply(_front(grad, in_dims[0], info), spec, *saved), 0
        # the forward itself ran under this vmap: the batch is one more lead dim of everything
        saved = tuple(_front(t, d, info) for t, d in zip(saved, saved_dims, strict=True))
        grad = _front(grad, in_dims[0], info)
        norm = TowerSaved.unflatten(saved).final.norm  # [K, *lead, n, 1]
        n_extra = grad.dim() - norm.dim()  # grad [K, *extra, *lead, n, D]
        grad = grad.movedim(0, n_extra)
        return _Backward.apply(grad, spec, *saved), n_extra


def _front(t: Tensor, dim: int | None, info: Any) -> Tensor:
    """The vmapped dimension of t at the front (expanded when t is not batched)."""
    if dim is None:
        return t.unsqueeze(0).expand(info.batch_size, *t.shape)
    return t.movedim(dim, 0)


# -- the math ----------------------------------------------------------------------------------
#
# Cotangents are laid out [L, R, E, W]: lead (prompts), rows, samples, width. The weight
# products see L R E rows; in attention the heads come out as [L, H, R, E, hd], where every
# product with a saved (per-prompt) tensor is one batched matmul with the samples folded into
# its rows or columns, without copies. Saved tensors get a size-1 sample axis (`_each`).


def _each(t: Tensor) -> Tensor:
    """A saved [L, R, X] tensor broadcast over the samples: [L, R, 1, X]."""
    return t.unsqueeze(-2)


def _ln_back(dh: Tensor, x_hat: Tensor, rstd: Tensor, ln: nn.Module) -> Tensor:
    """Input gradient of an affine layer norm with frozen weight from (x_hat, 1/std) saved
    [L, R, W] and [L, R, 1]; dh [L, R, E, W]."""
    g = dh * ln.weight.to(dh.dtype)
    g = g.to(torch.promote_types(g.dtype, x_hat.dtype))
    x_hat = _each(x_hat)
    mean_g = g.mean(-1, keepdim=True)
    mean_gx = (g * x_hat).mean(-1, keepdim=True)
    return (g - mean_g - x_hat * mean_gx) * _each(rstd)


def _ls_back(ls: nn.Module, d: Tensor) -> Tensor:
    gamma = getattr(ls, "gamma", None)
    return d if gamma is None else d * gamma.to(d.dtype)


def _mlp_back(block: nn.Module, dy: Tensor, slope: Tensor) -> Tensor:
    """d LN2-output of y = x1 + ls2 MLP(h2): W_fc^T (act' * W_proj^T ls2 dy)."""
    mlp = block.mlp
    da = (_ls_back(block.ls_2, dy) @ mlp.c_proj.weight) * _each(slope)
    return da @ mlp.c_fc.weight


def _split_heads(d: Tensor, heads: int) -> Tensor:
    """[L, R, E, W] -> [L, H, R, E, hd] (contiguous)."""
    return d.unflatten(-1, (heads, -1)).permute(0, 3, 1, 2, 4).contiguous()


def _merge_heads(d: Tensor) -> Tensor:
    """[L, H', R, E, hd] -> [L, R, E, H' hd]."""
    return d.permute(0, 2, 3, 1, 4).flatten(-2)


def _t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def _rows(t: Tensor, n_pre: int, n_cls: int, dim: int = -2) -> tuple[Tensor, Tensor]:
    """The prefix rows of t along `dim`, and the class rows split per class [.., n, S, ..]."""
    pre, own = t.split([n_pre, t.shape[dim] - n_pre], dim=dim)
    return pre, own.unflatten(dim, (n_cls, -1))


def _join_rows(pre: Tensor, own: Tensor) -> Tensor:
    """Inverse of `_rows` for [L, H, P, E, hd] and [L, H, n, S, E, hd]: [L, H, R, E, hd]."""
    return torch.cat([pre, own.flatten(2, 3)], dim=2)


def _softmax_back(d_probs: Tensor, probs: Tensor, total: Tensor) -> Tensor:
    """dS = P * (dP - sum_j dP_j P_j), with the sum given."""
    return probs * (d_probs - total)


def _prefix_attention_back(
    d_pre: Tensor, q: Tensor, k: Tensor, v: Tensor, probs: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Causal attention among the prefix rows: d_pre [L, H, P, E, hd]; q (scaled), k, v
    [L, H, P, hd]; probs [L, H, P, P]. Returns (dq, dk, dv), each [L, H, P, E, hd]."""
    lead, n_pre, n_each = d_pre.shape[:2], d_pre.shape[2], d_pre.shape[3]
    d_rows = d_pre.flatten(2, 3)  # [L, H, P E, hd]
    probs_e = probs.unsqueeze(-2)  # [L, H, P, 1, P]
    dp = (d_rows @ _t(v)).unflatten(2, (n_pre, n_each))  # [L, H, P, E, P]
    ds = _softmax_back(dp, probs_e, (dp * probs_e).sum(-1, keepdim=True))
    dq = (ds.flatten(2, 3) @ k).unflatten(2, (n_pre, n_each))
    dk = (_t(ds.reshape(*lead, n_pre, -1)) @ q).unflatten(2, (n_each, n_pre)).transpose(2, 3)
    dv = (_t(probs) @ d_pre.flatten(3)).unflatten(-1, (n_each, -1))
    return dq, dk, dv


def _class_attention_back(
    d_out: Tensor,
    q: Tensor,
    k_pre: Tensor,
    v_pre: Tensor,
    k_suf: Tensor,
    v_suf: Tensor,
    p_pre: Tensor,
    p_suf: Tensor,
    *,
    prefix_only: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of shared_prefix._class_attention for cotangents d_out [L, H, n, Q, E, hd] against
    its saved inputs q [L, H, n, Q, hd] (scaled), k_pre, v_pre [L, H, P, hd], k_suf, v_suf
    [L, H, n, S, hd] and probabilities p_pre [L, H, n, Q, P], p_suf [L, H, n, Q, S].
    Returns (dk_pre, dv_pre [L, H, P, E, hd], dq [L, H, n, Q, E, hd], dk_suf, dv_suf
    [L, H, n, S, E, hd]); with `prefix_only` the last three (the class rows' own inputs) are
    None."""
    lead = d_out.shape[:2]
    n, rows, n_each = d_out.shape[2], d_out.shape[3], d_out.shape[4]
    n_pre, n_suf = p_pre.shape[-1], p_suf.shape[-1]
    pe_pre, pe_suf = p_pre.unsqueeze(-2), p_suf.unsqueeze(-2)  # [L, H, n, Q, 1, P | S]
    dp_pre = (d_out.flatten(2, 4) @ _t(v_pre)).view(*lead, n, rows, n_each, n_pre)
    dp_suf = (d_out.flatten(3, 4) @ _t(v_suf)).view(*lead, n, rows, n_each, n_suf)
    total = (dp_pre * pe_pre).sum(-1, keepdim=True) + (dp_suf * pe_suf).sum(-1, keepdim=True)
    ds_pre = _softmax_back(dp_pre, pe_pre, total)
    ds_flat = ds_pre.reshape(*lead, n * rows, n_each * n_pre)  # [L, H, n Q, E P]
    q_flat = q.flatten(2, 3)  # [L, H, n Q, hd]
    dk_pre = (_t(ds_flat) @ q_flat).unflatten(2, (n_each, n_pre)).transpose(2, 3)
    dv_pre = (_t(p_pre.flatten(2, 3)) @ d_out.flatten(2, 3).flatten(3)).unflatten(-1, (n_each, -1))
    if prefix_only:
        return dk_pre, dv_pre, None, None, None
    ds_suf = _softmax_back(dp_suf, pe_suf, total)
    dq = (ds_pre.flatten(2, 4) @ k_pre).view(*lead, n, rows, n_each, -1) + (
        ds_suf.flatten(3, 4) @ k_suf
    ).view(*lead, n, rows, n_each, -1)
    by_sample = ds_suf.reshape(*lead, n, rows, n_each * n_suf)  # [L, H, n, Q, E S]
    dk_suf = (_t(by_sample) @ q).unflatten(3, (n_each, n_suf)).transpose(3, 4)
    dv_suf = (_t(p_suf) @ d_out.flatten(4)).unflatten(-1, (n_each, -1))
    return dk_pre, dv_pre, dq, dk_suf, dv_suf


def _block_back(
    block: nn.Module,
    dy: Tensor,
    saved: BlockSaved,
    *,
    n_pre: int,
    n_cls: int,
    prefix_only: bool = False,
) -> Tensor:
    """dx [L, R, E, W] of shared_prefix.shared_prefix_block from dy [L, R, E, W]; with
    `prefix_only`, dx of the prefix rows [L, P, E, W] only (the first block, whose class rows
    are constant token embeddings: their queries, keys and values need no gradient, but their
    attention to the prefix still sends gradient to its keys and values)."""
    attn, heads = block.attn, block.attn.num_heads
    scale = (saved.q.shape[-1]) ** -0.5
    dx1 = dy + _ln_back(_mlp_back(block, dy, saved.slope), saved.x_hat2, saved.rstd2, block.ln_2)
    d_out = _split_heads(_ls_back(block.ls_1, dx1) @ attn.out_proj.weight, heads)
    (q_pre, q_suf), (k_pre, k_suf), (v_pre, v_suf) = (
        _rows(t, n_pre, n_cls) for t in (saved.q, saved.k, saved.v)
    )
    d_pre, d_suf = _rows(d_out, n_pre, n_cls, dim=2)
    dq, dk, dv = _prefix_attention_back(d_pre, q_pre, k_pre, v_pre, saved.probs_pre)
    dk_pre2, dv_pre2, dq_suf, dk_suf, dv_suf = _class_attention_back(
        d_suf,
        q_suf,
        k_pre,
        v_pre,
        k_suf,
        v_suf,
        saved.p_pre,
        saved.p_suf,
        prefix_only=prefix_only,
    )
    dk, dv = dk + dk_pre2, dv + dv_pre2
    if dq_suf is not None and dk_suf is not None and dv_suf is not None:
        dq, dk, dv = _join_rows(dq, dq_suf), _join_rows(dk, dk_suf), _join_rows(dv, dv_suf)
    rows = dq.shape[2]
    dh = _merge_heads(torch.cat([dq * scale, dk, dv], dim=1)) @ attn.in_proj_weight
    part = (saved.x_hat1[:, :rows], saved.rstd1[:, :rows])
    return dx1[:, :rows] + _ln_back(dh, *part, block.ln_1)


def _last_block_back(
    block: nn.Module, dy: Tensor, saved: LastBlockSaved, *, n_pre: int, eot_rows: Tensor
) -> Tensor:
    """dx [L, R, E, W] of shared_prefix.last_block_eot from dy [L, n, E, W] (the EOT rows)."""
    q = saved.q
    attn, heads = block.attn, block.attn.num_heads
    width = attn.embed_dim
    n_cls = q.shape[-3]
    dy1 = dy + _ln_back(_mlp_back(block, dy, saved.slope), saved.x_hat2, saved.rstd2, block.ln_2)
    d_out = _split_heads(_ls_back(block.ls_1, dy1) @ attn.out_proj.weight, heads).unsqueeze(3)
    (k_pre, k_suf), (v_pre, v_suf) = (_rows(t, n_pre, n_cls) for t in (saved.k, saved.v))
    dk_pre, dv_pre, dq, dk_suf, dv_suf = _class_attention_back(
        d_out, q, k_pre, v_pre, k_suf, v_suf, saved.p_pre, saved.p_suf
    )  # the EOT rows' queries: Q = 1
    assert dq is not None and dk_suf is not None and dv_suf is not None
    dk, dv = _join_rows(dk_pre, dk_suf), _join_rows(dv_pre, dv_suf)
    dh = _merge_heads(torch.cat([dk, dv], dim=1)) @ attn.in_proj_weight[width:]  # [L, R, E, W]
    dq_rows = _merge_heads(dq.squeeze(3) * q.shape[-1] ** -0.5) @ attn.in_proj_weight[:width]
    dh = dh.index_add(1, eot_rows, dq_rows.to(dh.dtype))
    dx = _ln_back(dh, saved.x_hat1, saved.rstd1, block.ln_1)
    return dx.index_add(1, eot_rows, dy1.to(dx.dtype))


# On CPU one backward call covers at most about this many rows (prompts x samples x tower rows):
# the working set of a call (~20 tensors of rows x width floats, the MLP's 4x wider) then stays
# near the L2/L3 sizes; the clients of a batched step (step_compute.StepComputer.batched) run in
# chunks of prompts rather than as one call ~10x larger, which ran 1.1-1.7x slower per row.
CPU_ROWS_PER_CALL = 2**13


def tower_backward(spec: _Spec, saved: TowerSaved, dz: Tensor) -> Tensor:
    """d ctx [E, *lead, n_ctx, W] from d features dz [E, *lead, n, D] (normalised features);
    with deep prompts (`spec.n_deep` = J - 1), d ctx and d deeper as [E, *lead, J n_ctx, W],
    the context's rows first, then each deep prompt's.

    On CPU (`_calls`) the prompts run in calls of at most CPU_ROWS_PER_CALL rows, and the rows
    (samples) whose cotangent is zero for a prompt are left out of its backward (their
    gradient is zero): padding rows of a batched step's smaller clients, and FedPGP's sigma
    prompt, which feeds only its data-independent prior, so that only the prior's row (the
    last, privacy/per_sample.py) is live for it. Elsewhere one call does everything."""
    lead = saved.lead
    saved = saved.map(lambda t: t.reshape(-1, *t.shape[len(lead) :]))  # one lead dim L
    dz = dz.reshape(dz.shape[0], -1, *dz.shape[1 + len(lead) :])  # [E, L, n, D]
    calls = _calls(dz, rows=saved.last.x_hat1.shape[1])
    if calls is None:
        out = _backward(spec, saved, dz.permute(1, 2, 0, 3))  # [L, n_ctx, E, W]
    else:
        out = None
        for prompts, rows in calls:
            part = _backward(
                spec, saved.map(itemgetter(prompts)), dz[rows][:, prompts].permute(1, 2, 0, 3)
            )  # [l, n_ctx, e, W]
            if out is None:
                out = part.new_zeros(dz.shape[1], part.shape[1], dz.shape[0], part.shape[3])
            out[prompts.unsqueeze(-1), :, rows] = part.permute(0, 2, 1, 3)
        assert out is not None
    return out.permute(2, 0, 1, 3).reshape(out.shape[2], *lead, *out.shape[1:2], out.shape[3])


def _calls(dz: Tensor, *, rows: int) -> list[tuple[Tensor, Tensor]] | None:
    """The backward calls for dz [E, L, n, D] on a tower of `rows` rows: (prompt indices, row
    indices) each. Prompts whose cotangents are nonzero in exactly the same rows go together,
    at most CPU_ROWS_PER_CALL // (live rows x rows) prompts per call. None (one call for
    everything) when every row is live and fits in one call, when no row is (no shortcut),
    and on devices where the zero check is a host sync."""
    if dz.device.type != "cpu":
        return None
    live = dz.ne(0).flatten(2).any(-1)  # [E, L]
    n_rows, n_prompts = live.shape
    fits = n_rows * n_prompts * rows <= CPU_ROWS_PER_CALL
    if (fits and bool(live.all())) or not bool(live.any()):
        return None
    by_pattern: dict[tuple[bool, ...], list[int]] = {}
    for prompt, pattern in enumerate(live.t().tolist()):
        if any(pattern):
            by_pattern.setdefault(tuple(pattern), []).append(prompt)
    calls = []
    for pattern, prompts in by_pattern.items():
        picked = [i for i, on in enumerate(pattern) if on]
        size = max(1, CPU_ROWS_PER_CALL // (len(picked) * rows))
        for start in range(0, len(prompts), size):
            calls.append(
                (
                    torch.tensor(prompts[start : start + size], device=dz.device),
                    torch.tensor(picked, device=dz.device),
                )
            )
    return calls


def _backward(spec: _Spec, saved: TowerSaved, dz: Tensor) -> Tensor:
    """d ctx [L, n_ctx, E, W] from dz [L, n, E, D]; with deep prompts, [L, J n_ctx, E, W]:
    the gradient at block i's context rows is deeper[i - 1]'s (it replaced them), and none of
    it flows to block i - 1's outputs there, which the replacement discarded."""
    tower = spec.tower
    blocks = list(tower.transformer.resblocks)
    n_pre = 1 + tower.n_ctx
    n_cls = spec.eot.shape[0]
    final = saved.final
    z, norm = _each(final.z), _each(final.norm)
    dz = dz.to(z.dtype)
    df = (dz - z * (dz * z).sum(-1, keepdim=True)) / norm.clamp_min(1e-12)
    proj = tower.projection
    if isinstance(proj, nn.Module):
        d_rows = df @ proj.weight.to(df.dtype)
    elif proj is not None:
        d_rows = df @ _t(proj).to(df.dtype)
    else:
        d_rows = df
    d = _ln_back(d_rows, final.x_hat, final.rstd, tower.ln_final)
    n_suf = spec.suffix.shape[-2]
    eot_rows = n_pre + torch.arange(n_cls, device=dz.device) * n_suf + (spec.eot - n_pre)
    d = _last_block_back(blocks[-1], d, saved.last, n_pre=n_pre, eot_rows=eot_rows)
    deep: list[Tensor] = [d[:, :0]] * spec.n_deep  # d deeper[i - 1], filled from the top
    for i in range(len(blocks) - 1, -1, -1):
        if i < len(blocks) - 1:
            d = _block_back(
                blocks[i], d, saved.blocks[i], n_pre=n_pre, n_cls=n_cls, prefix_only=i == 0
            )
        if 1 <= i <= spec.n_deep:
            deep[i - 1] = d[:, 1:n_pre]
            d = torch.cat([d[:, :1], torch.zeros_like(deep[i - 1]), d[:, n_pre:]], dim=1)
    return torch.cat([d[:, 1:n_pre], *deep], dim=1) if deep else d[:, 1:n_pre]
