"""Exact per-sample gradients of prompt parameters with one text-encoder forward.

A prompt method splits its loss in two. `encode(params) -> Z` is the expensive part that every
sample shares (the text transformer turning the context vectors into class features
[n_cls, D], or a dict of several such tensors); `sample_loss(Z, *batch_i) -> l_i` is the cheap
part that touches sample i (cosine logits of its image feature against Z, cross-entropy).
By the chain rule, for every parameter tensor p

    dl_i/dp = J_p(Z)^T  dl_i/dZ,

where J_p(Z) is the Jacobian of the encoder at the current params. It is the same for every
sample, so one `torch.func.vjp(encode, params)` gives `Z` and the linear map
`vjp_fn: v -> J_p(Z)^T v`. The per-sample cotangents `dl_i/dZ` come from
`vmap(grad(sample_loss))` (shape [B, *Z.shape]), and `vmap(vjp_fn)` maps them to the
per-sample gradients [B, *p.shape]. Nothing is approximated: each row is the ordinary
gradient of l_i, the encoder forward runs once (not B x n_cls sequences), and the vmapped
backward only re-uses the saved activations. This is what DP-SGD (Abadi et al. 2016, Alg. 1)
needs to clip each example's contribution; Opacus' module hooks cannot, because a prompt is
a parameter used by every sample of the batch (and they silently mix samples when the batch
size equals the class count).

Many clients at once (`client_step_gradients`): clients are independent, so the Jacobian of
their stacked encoders is block diagonal. One forward of `vmap(encode)` over the clients' stacked
parameters [K, ...] and one `vmap(vjp_fn)` over the sample slot j, whose cotangent holds sample j
of every client, give every client's per-sample gradients; batches of unequal size are padded
and the padded rows get zero cotangents (their gradients are exactly zero and are dropped).
tests/test_speed.py checks it equals client-by-client `step_gradients`.

Several losses per sample (`combine`): a learner may define a sample's loss as several terms
whose gradients it combines by a rule other than their sum (ProGrad projects the cross-entropy
gradient against the gradient of its KL to zero-shot CLIP). Each term's cotangent on Z comes
from one vmapped `jacrev` of the cheap loss, the B x L cotangents go through the same vmapped
vjp as extra rows (one backward of B L rows), and `combine` maps each sample's L gradients
{name: [L, *shape]} to its gradient before anything clips it: a per-sample, data-dependent
transform is part of that sample's contribution. Without per-sample gradients the rule applies
to the gradients of the batch means of the terms (their L cotangents are L rows of one
batched backward: the forward is then the per-sample one too). The prior is outside the rule
(as it is outside clipping), added after it.

`per_sample_loop=True` is the reference compute pattern kept for ablation: one encoder forward
and one backward per sample (what DP-SGD costs without the shared-forward identity above).

References: Abadi et al., "Deep Learning with Differential Privacy", CCS 2016
(arXiv 1607.00133); torch.func (functorch) `vjp`, `vmap`, `grad`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jacrev, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_leaves, tree_map

from fpl_bench.compute import per_sample_backward

__all__ = [
    "Forward",
    "StepGrads",
    "client_step_gradients",
    "encode_once",
    "loop_per_sample_grads",
    "step_gradients",
    "with_constants",
]

Encode = Callable[[dict[str, Tensor]], Any]
SampleLoss = Callable[..., Tensor]
# the gradients of a sample's L losses {name: [L, *shape]} -> its gradient {name: [*shape]}
Combine = Callable[[dict[str, Tensor]], dict[str, Tensor]]


def _detach_tree(tree: Any) -> Any:
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


def _batch_size(batch: tuple[Tensor, ...]) -> int:
    if not batch:
        raise ValueError("batch must hold at least one tensor with a leading batch dimension")
    sizes = {int(t.shape[0]) for t in batch}
    if len(sizes) != 1:
        raise ValueError(f"batch tensors disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


Forward = tuple[Any, Callable[..., Any]]  # (Z, vjp_fn) of one encoder forward


def encode_once(
    encode: Encode, params: Mapping[str, Tensor], *, math_attention: bool = False
) -> Forward:
    """Z = encode(params) and vjp_fn: cotangent on Z -> ({name: grad},), on detached inputs so
    that outer autograd state (params that require grad) never leaks into torch.func.

    math_attention: the per-sample case. Runs scaled_dot_product_attention with its MATH
    backend (matmul + softmax), and under `compute.per_sample_backward` (the text tower then
    builds its sample-batched backward, fpl_bench/text_tower/backward.py).
    The fused kernels' backward ops (flash / memory-efficient, CPU and CUDA) have no vmap
    batching rule, so `vmap(vjp_fn)` would fall back to a slow per-sample loop (with a
    "performance drop" warning); the math backend's backward is made of batchable ops.
    """
    primals = {k: v.detach() for k, v in params.items()}
    if math_attention:
        with sdpa_kernel([SDPBackend.MATH]), per_sample_backward():
            z, vjp_fn = vjp(encode, primals)
    else:
        z, vjp_fn = vjp(encode, primals)
    return _detach_tree(z), vjp_fn


Prior = Callable[[Any, dict[str, Tensor]], Tensor | None]
Constants = Callable[..., Tensor | None]


def with_constants(
    constants: Constants | None, z: Any, batch: tuple[Tensor, ...]
) -> tuple[Tensor, ...]:
    """`batch` plus `constants(Z, *batch)` (computed without gradient) when it gives a tensor.

    Whatever the loss reads without differentiating it, and that is cheaper on the whole batch
    than under vmap, goes here; per sample it is then an input like the image (FedOTP's
    transport plans: under vmap their Sinkhorn loop could not stop early).
    """
    if constants is None or not batch or batch[0].numel() == 0:
        return batch
    with torch.no_grad():
        extra = constants(z, *batch)
    return batch if extra is None else (*batch, extra.detach())


@dataclass(frozen=True)
class StepGrads:
    """Gradients of one local step.

    data:   per-sample gradients {name: [B, *shape]} (per_sample=True) or the gradient of
            mean_i l_i + prior {name: [*shape]} (per_sample=False)
    losses: per-sample losses [B]
    prior:  gradient of the prior {name: [*shape]} when per_sample=True and there is one;
            None otherwise (without per-sample gradients it is already in `data`)
    """

    data: dict[str, Tensor]
    losses: Tensor
    prior: dict[str, Tensor] | None


def _append_row(rows: Tensor, row: Tensor) -> Tensor:
    """rows [n, *shape] with `row` [*shape] appended: [n + 1, *shape]."""
    return torch.cat([rows, row.unsqueeze(0).to(rows.dtype)])


def _add(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: a[k] + b[k] if k in b else a[k] for k in a}


def _prior_cotangents(
    prior: Prior, z: Any, params: dict[str, Tensor]
) -> tuple[Any, dict[str, Tensor]] | None:
    """(d prior / dZ, d prior / d params directly), or None when the prior is None here."""
    primals = {k: v.detach() for k, v in params.items()}
    if prior(z, primals) is None:
        return None
    gz, gp = grad(lambda zz, pp: prior(zz, pp), argnums=(0, 1))(z, primals)
    return gz, gp


def _loop_combined(
    losses_of: Callable[[dict[str, Tensor]], Tensor], primals: dict[str, Tensor], combine: Combine
) -> tuple[dict[str, Tensor], Tensor]:
    """One sample's combined gradient and first loss, from its losses as a function of the
    params: one forward, one backward per loss."""
    losses, vjp_fn = vjp(losses_of, primals)
    basis = torch.eye(len(losses), dtype=losses.dtype, device=losses.device)
    rows = [vjp_fn(basis[j])[0] for j in range(len(losses))]
    return combine({k: torch.stack([r[k] for r in rows]) for k in primals}), losses[0]


def loop_per_sample_grads(
    encode: Encode,
    sample_loss: SampleLoss,
    params: dict[str, Tensor],
    batch: tuple[Tensor, ...],
    combine: Combine | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-sample gradients {name: [B, *shape]} and losses [B] by B separate forward and
    backward passes through the encoder: the reference compute pattern (ablation only; the
    same values as the vmapped per-sample gradients of `step_gradients` to float rounding).
    With `combine`, sample_loss gives L losses; each sample's gradient is `combine` of their
    L gradients and its loss the first."""
    n = _batch_size(batch)
    primals = {k: v.detach() for k, v in params.items()}
    rows: list[dict[str, Tensor]] = []
    losses: list[Tensor] = []
    for i in range(n):
        sample = tuple(t[i].detach() for t in batch)
        if combine is not None:
            grads, loss = _loop_combined(
                lambda p, s=sample: sample_loss(encode(p), *s), primals, combine
            )
        else:
            grads, loss = grad_and_value(lambda p, s=sample: sample_loss(encode(p), *s))(primals)
        rows.append(grads)
        losses.append(loss)
    if not rows:
        empty = {k: v.new_zeros((0, *v.shape)) for k, v in primals.items()}
        return empty, next(iter(primals.values())).new_zeros(0)
    return {k: torch.stack([r[k] for r in rows]) for k in primals}, torch.stack(losses)


def _loss_jacobian(sample_loss: SampleLoss) -> Callable[..., tuple[Any, Tensor]]:
    """(Z, *sample) -> (the cotangent on Z of each of the sample's L losses, leaves
    [L, *leaf], and the losses [L])."""

    def losses_twice(z: Any, *sample: Tensor) -> tuple[Tensor, Tensor]:
        losses = sample_loss(z, *sample)
        return losses, losses

    return jacrev(losses_twice, has_aux=True)


def _vmapped(fn: Callable[..., Any], levels: int) -> Callable[..., Any]:
    for _ in range(levels):
        fn = vmap(fn)
    return fn


def _combined_rows(
    vjp_fn: Callable[..., Any], cot: Any, combine: Combine, *, dim: int, chunk_size: int | None
) -> dict[str, Tensor]:
    """Combined per-sample gradients {name: [..., B, *shape]} from per-sample cotangents of
    each loss (leaves [..., B, L, *leaf], samples at `dim`: 0 for one client, 1 behind the
    clients): the B x L rows go through one vmapped backward, then `combine` per sample."""
    leaf = tree_leaves(cot)[0]
    rows, n_losses = leaf.shape[dim], leaf.shape[dim + 1]
    flat = tree_map(lambda t: t.flatten(dim, dim + 1), cot)
    (data,) = vmap(vjp_fn, in_dims=dim, out_dims=dim, chunk_size=chunk_size)(flat)
    data = {k: v.unflatten(dim, (rows, n_losses)) for k, v in dict(data).items()}
    return _vmapped(combine, dim + 1)(data)


def _combined_means(
    vjp_fn: Callable[..., Any], cot: Any, combine: Combine, *, dim: int
) -> dict[str, Tensor]:
    """`combine` of the gradients of L batch-mean losses, from their cotangents (leaves
    [L, *leaf]): the L rows go through one vmapped backward (the forward of a step with
    `combine` is the per-sample one, `encode_once(math_attention=True)`, even without DP:
    measured on the embedded tower, a ProGrad round then costs 1.0-1.4x CoOp's instead of
    1.4-1.8x with one backward per loss); the gradients of a loss stand at `dim` (0 for one
    client, 1 behind the clients)."""
    (stacked,) = vmap(vjp_fn, out_dims=dim)(cot)
    stacked = dict(stacked)
    return _vmapped(combine, dim)(stacked)


def step_gradients(
    encode: Encode,
    sample_loss: SampleLoss,
    params: dict[str, Tensor],
    batch: tuple[Tensor, ...],
    *,
    per_sample: bool,
    prior: Prior | None = None,
    chunk_size: int | None = None,
    per_sample_loop: bool = False,
    constants: Constants | None = None,
    forward: Forward | None = None,
    combine: Combine | None = None,
) -> StepGrads:
    """The gradients a local step needs, with one encoder forward.

    The local objective is  mean_i l_i + prior(Z, params)  where the prior (KgCoOp's distance
    to CLIP's features, FedPGP's contrastive term, FedProx's proximal term) reads no training
    record. Its gradient J^T dprior/dZ + dprior/dparams re-uses the vjp of the one forward.
    With `per_sample` the data part is per sample (for clipping) and the prior part is
    returned apart (it is neither clipped nor noised); without, both are summed.
    `per_sample_loop` takes the per-sample part by one forward and backward per sample
    (`loop_per_sample_grads`, the reference compute pattern; ablation only).
    `constants(Z, *batch)` -> [B, ...] or None: per-sample values the loss reads as constants
    (no gradient flows through them), computed once for the batch outside vmap and handed to
    sample_loss as one more batch tensor (`with_constants`).
    `forward`: `encode_once(encode, params, math_attention=per_sample or combine is not None)`
    when the caller has it
    already (its vjp_fn may be applied any number of times): clients whose step parameters
    are equal share one forward (step_compute.StepComputer._forward).
    `combine`: sample_loss gives L losses [L] and the data gradient is `combine` of their L
    gradients, per sample (`per_sample`) or of the batch means; losses are the first's
    (module docstring). The prior is added after it, apart from it under `per_sample`.
    """
    n = _batch_size(batch)
    if forward is None:
        forward = encode_once(encode, params, math_attention=per_sample or combine is not None)
    z, vjp_fn = forward
    prior_cot = None if prior is None else _prior_cotangents(prior, z, params)
    batch = with_constants(constants, z, tuple(t.detach() for t in batch))
    in_dims = (None, *(0 for _ in batch))
    if per_sample:
        folded = False  # the prior's cotangent went through the backward as row n
        if n and per_sample_loop:
            data, losses = loop_per_sample_grads(encode, sample_loss, params, batch, combine)
        elif n and combine is not None:
            per_loss = vmap(_loss_jacobian(sample_loss), in_dims=in_dims, chunk_size=chunk_size)
            cot, all_losses = per_loss(z, *batch)  # leaves [B, L, ...], [B, L]
            data = _combined_rows(vjp_fn, cot, combine, dim=0, chunk_size=chunk_size)
            losses = all_losses[:, 0]
        elif n:
            cot, losses = vmap(grad_and_value(sample_loss), in_dims=in_dims, chunk_size=chunk_size)(
                z, *batch
            )
            if prior_cot is not None and chunk_size is None:
                # the prior's cotangent rides as row n of the per-sample backward: one batched
                # backward of n + 1 rows instead of n rows and a separate pass for one
                cot = tree_map(_append_row, cot, prior_cot[0])
                folded = True
            (data,) = vmap(vjp_fn, chunk_size=chunk_size)(cot)
            data = dict(data)
        else:
            data = {k: v.detach().new_zeros((0, *v.shape)) for k, v in params.items()}
            losses = next(iter(params.values())).new_zeros(0)
        prior_grads = None
        if prior_cot is not None:
            if folded:
                through_z = {k: g[n] for k, g in data.items()}
                data = {k: g[:n] for k, g in data.items()}
            else:
                (through_z,) = vjp_fn(prior_cot[0])
            prior_grads = _add(dict(through_z), prior_cot[1])
        return StepGrads(data=data, losses=losses, prior=prior_grads)
    if combine is not None:

        def mean_losses(zz: Any) -> tuple[Tensor, Tensor]:
            losses = vmap(sample_loss, in_dims=in_dims)(zz, *batch)  # [B, L]
            return losses.mean(0), losses

        means = mean_losses if n else None
        return _combined_mean_step(vjp_fn, z, means, params, combine, prior_cot, dim=0)
    if n:

        def mean_loss(zz: Any) -> tuple[Tensor, Tensor]:
            losses = vmap(sample_loss, in_dims=in_dims)(zz, *batch)
            return losses.mean(), losses

        cot, losses = grad(mean_loss, has_aux=True)(z)
        losses = losses.detach()
    else:
        cot = tree_map(torch.zeros_like, z)
        losses = next(iter(params.values())).new_zeros(0)
    direct: dict[str, Tensor] = {}
    if prior_cot is not None:
        cot = tree_map(torch.add, cot, prior_cot[0])
        direct = prior_cot[1]
    (data,) = vjp_fn(cot)
    return StepGrads(data=_add(dict(data), direct), losses=losses, prior=None)


def _with_prior(
    data: dict[str, Tensor],
    vjp_fn: Callable[..., Any],
    prior_cot: tuple[Any, dict[str, Tensor]] | None,
) -> dict[str, Tensor]:
    """data + the prior's gradient (through Z and direct), when there is a prior."""
    if prior_cot is None:
        return data
    (through_z,) = vjp_fn(prior_cot[0])
    return _add(data, _add(dict(through_z), prior_cot[1]))


MeanLosses = Callable[[Any], tuple[Tensor, Tensor]]


def _combined_mean_step(
    vjp_fn: Callable[..., Any],
    z: Any,
    mean_losses: MeanLosses | None,
    params: dict[str, Tensor],
    combine: Combine,
    prior_cot: tuple[Any, dict[str, Tensor]] | None,
    *,
    dim: int,
) -> StepGrads:
    """A step without per-sample gradients, with `combine`: the rule on the gradients of the L
    batch-mean losses, then the prior. mean_losses: Z -> (the L batch means (summed over the
    clients, whose Jacobians are apart), per-sample losses [..., B, L]); None for an empty
    batch. dim: 0 for one client, 1 for clients stacked (params [K, *shape])."""
    if mean_losses is not None:
        cot, losses = jacrev(mean_losses, has_aux=True)(z)  # leaves [L, ...]
        data = _combined_means(vjp_fn, cot, combine, dim=dim)
        losses = losses.detach()[..., 0]
    else:
        data = {k: torch.zeros_like(v) for k, v in params.items()}
        first = next(iter(params.values()))
        losses = first.new_zeros(*first.shape[:dim], 0)  # [0] or [K, 0]
    data = {k: v.detach() for k, v in data.items()}
    return StepGrads(data=_with_prior(data, vjp_fn, prior_cot), losses=losses, prior=None)


ClientEncode = Callable[[dict[str, Tensor], Any], Any]
ClientPrior = Callable[[Any, dict[str, Tensor], Any], "Tensor | None"]


def _pick(tree: Any, k: int) -> Any:
    return tree_map(lambda t: t[k] if isinstance(t, Tensor) else t, tree)


def _mask_rows(tree: Any, valid: Tensor) -> Any:
    """Zero the rows [K, B, ...] of every leaf where valid [K, B] is False (NaN-safe)."""

    def mask(t: Tensor) -> Tensor:
        keep = valid.reshape(*valid.shape, *([1] * (t.dim() - 2)))
        return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))

    return tree_map(mask, tree)


def _client_by_client(
    per_client: Callable[..., tuple[Any, Tensor]],
    z: Any,
    batch: tuple[Tensor, ...],
    sizes: Sequence[int],
) -> tuple[Any, Tensor]:
    """Per-sample cotangents and losses [K, B, ...] of each client's real rows, one client at
    a time (padding rows zero). On CPU a matmul batched over clients (bmm) rounds differently
    from the same product for one client (mm); this way each client's loss is the very
    computation of a step for that client alone (`step_gradients`), and padding rows cost
    nothing. The calls are few and small. A client whose Poisson batch is empty is not called
    (a loss that picks its label's logit cannot be vmapped over no samples): its rows stay
    zero."""
    drawn = [k for k, n in enumerate(sizes) if n > 0]
    outs = {k: per_client(_pick(z, k), *(t[k, : sizes[k]] for t in batch)) for k in drawn}
    width = batch[0].shape[1]

    def padded(*rows: Tensor) -> Tensor:
        out = rows[0].new_zeros(len(sizes), width, *rows[0].shape[1:])
        for k, r in zip(drawn, rows, strict=True):
            out[k, : sizes[k]] = r
        return out

    cot = tree_map(padded, *[outs[k][0] for k in drawn])
    return cot, padded(*[outs[k][1] for k in drawn])


def client_step_gradients(
    encode: ClientEncode,
    sample_loss: SampleLoss,
    params: dict[str, Tensor],
    extra: Any,
    batch: tuple[Tensor, ...],
    sizes: Sequence[int],
    *,
    per_sample: bool,
    prior: ClientPrior | None = None,
    chunk_size: int | None = None,
    constants: Constants | None = None,
    shared: bool = False,
    combine: Combine | None = None,
) -> StepGrads:
    """`step_gradients` of K clients at once, with one encoder forward for all of them.

    encode: (params of one client, extra of one client) -> Z; vmapped over the clients.
    params: {name: [K, *shape]} the clients' step parameters, stacked.
    extra: a pytree of [K, ...] tensors per client that encode and prior read (not
           differentiated), e.g. a scheme's auxiliary values and a proximal anchor.
    batch: tensors [K, B, ...], client k's samples in rows 0 .. sizes[k] - 1, padding after.
    sizes: number of real samples of each client (host integers: the padding mask is built
           on the device without a host-to-device copy).
    prior: (Z of one client, params of one client, extra of one client) -> scalar or None.
    constants: (Z of all clients [K, ...], *batch [K, B, ...]) -> [K, B, ...] or None, as in
           `step_gradients` (padded rows included; their losses are masked anyway).
    shared: every client's params and extra are equal (the caller checked, bit for bit: at
           the first step of a round every client starts from the global prompt): the
           encoder runs once, on client 0's, its Z stands for every client's, and each
           client's cotangent goes back through that one forward (`vmap` of its vjp over the
           clients). Equal to the stacked computation up to float rounding (a matmul of one
           prompt's rows rounds differently from the same rows stacked with other clients').
    combine: as in `step_gradients` (one client's rule; vmapped over clients and samples).

    Returns StepGrads with data {name: [K, B, *shape]} (per_sample; padded rows zero) or
    {name: [K, *shape]} (the gradient of each client's mean loss + prior), losses [K, B]
    (padded rows zero) and prior {name: [K, *shape]} or None. Client k's values equal
    `step_gradients` on client k alone (module docstring).
    """
    n_clients, width = batch[0].shape[0], batch[0].shape[1]
    primals = {k: v.detach() for k, v in params.items()}
    extra = _detach_tree(extra)
    several = per_sample or combine is not None  # a backward of several rows per forward
    batched = per_sample_backward() if several else contextlib.nullcontext()
    with sdpa_kernel([SDPBackend.MATH]), batched:
        if shared:
            first = _pick(extra, 0)
            z, one_vjp = vjp(lambda p: encode(p, first), _pick(primals, 0))
            z = tree_map(lambda t: t.expand(n_clients, *t.shape), z)
            vjp_fn = vmap(one_vjp)  # client k's cotangent through the one forward
        else:
            z, vjp_fn = vjp(lambda p: vmap(encode)(p, extra), primals)
    z = _detach_tree(z)
    rows = torch.arange(width, device=batch[0].device)
    valid = torch.stack([rows < int(n) for n in sizes])  # [K, B]
    batch = with_constants(constants, z, tuple(t.detach() for t in batch))
    per_sample_cot = grad_and_value(sample_loss) if combine is None else _loss_jacobian(sample_loss)
    per_client = vmap(per_sample_cot, in_dims=(None, *(0 for _ in batch)))
    prior_cot = None
    if prior is not None and prior(_pick(z, 0), _pick(primals, 0), _pick(extra, 0)) is not None:

        def total_prior(zz: Any, pp: dict[str, Tensor]) -> Tensor:
            return vmap(prior)(zz, pp, extra).sum()

        prior_cot = grad(total_prior, argnums=(0, 1))(z, primals)
    if per_sample:
        if width:
            if batch[0].device.type == "cpu":
                cot, losses = _client_by_client(per_client, z, batch, sizes)
            else:
                cot, losses = vmap(per_client, chunk_size=chunk_size)(z, *batch)  # [K, B, ...]
                cot, losses = _mask_rows(cot, valid), _mask_rows(losses, valid)
            if combine is not None:  # cot [K, B, L, ...], losses [K, B, L]
                data = _combined_rows(vjp_fn, cot, combine, dim=1, chunk_size=chunk_size)
                losses = losses[:, :, 0]
            else:
                (data,) = vmap(vjp_fn, in_dims=1, out_dims=1, chunk_size=chunk_size)(cot)
                data = dict(data)
        else:
            data = {k: v.new_zeros((n_clients, 0, *v.shape[1:])) for k, v in primals.items()}
            losses = next(iter(primals.values())).new_zeros(n_clients, 0)
        prior_grads = None
        if prior_cot is not None:
            (through_z,) = vjp_fn(prior_cot[0])
            prior_grads = _add(dict(through_z), prior_cot[1])
        return StepGrads(data=data, losses=losses, prior=prior_grads)
    if combine is not None:

        def mean_losses(zz: Any) -> tuple[Tensor, Tensor]:
            losses = vmap(vmap(sample_loss, in_dims=(None, *(0 for _ in batch))))(zz, *batch)
            losses = _mask_rows(losses, valid)  # [K, B, L]
            real = valid.to(losses.dtype)
            weights = real / real.sum(-1, keepdim=True).clamp(min=1)  # 1 / n_k on real rows
            return (losses * weights.unsqueeze(-1)).sum((0, 1)), losses

        means = mean_losses if width else None
        return _combined_mean_step(vjp_fn, z, means, primals, combine, prior_cot, dim=1)
    weights = valid / valid.sum(-1, keepdim=True).clamp(min=1)  # [K, B], 1 / n_k on real rows

    def mean_loss(zz: Any) -> tuple[Tensor, Tensor]:
        losses = vmap(vmap(sample_loss, in_dims=(None, *(0 for _ in batch))))(zz, *batch)
        losses = _mask_rows(losses, valid)
        return (losses * weights.to(losses.dtype)).sum(), losses

    if width:
        cot, losses = grad(mean_loss, has_aux=True)(z)
        losses = losses.detach()
    else:
        cot = tree_map(torch.zeros_like, z)
        losses = next(iter(primals.values())).new_zeros(n_clients, 0)
    direct: dict[str, Tensor] = {}
    if prior_cot is not None:
        cot = tree_map(torch.add, cot, prior_cot[0])
        direct = prior_cot[1]
    (data,) = vjp_fn(cot)
    return StepGrads(data=_add(dict(data), direct), losses=losses, prior=None)
