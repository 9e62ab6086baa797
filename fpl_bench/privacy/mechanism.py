"""The Gaussian mechanism of DP-SGD on per-sample gradients: clip, sum, noise, scale.

Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (arXiv 1607.00133), Alg. 1:

    g_i      = per-sample gradient of example i, over ALL privatized parameters jointly
    g~_i     = g_i * min(1, C / ||g_i||_2)                      (clip: sensitivity C)
    g^       = (sum_i g~_i + N(0, sigma^2 C^2 I)) / E[B]         (noise, then average)

Under Poisson sampling with rate q (the setting the accountants analyse: Mironov et al. 2019,
"Renyi Differential Privacy of the Sampled Gaussian Mechanism", arXiv 1908.10530) the realised
batch size B is random and may be 0; the sum is divided by the EXPECTED batch size
E[B] = q * n, a constant, never by B itself (dividing by B would leak B and change the
sensitivity). The joint norm matters: clipping each parameter tensor to C separately gives a
sensitivity of C * sqrt(#tensors), which the accountant does not know about.

Every function is pure: dicts in, new dicts out, nothing modified in place. Dict order is kept;
noise is drawn over the names in sorted order so that it does not depend on insertion order.

    >>> g = {"a": torch.tensor([[3.0, 4.0]]), "b": torch.tensor([[0.0, 0.0, 12.0]])}
    >>> float(per_sample_norms(g)[0])
    13.0
    >>> total = clipped_sum(g, clip_norm=1.0)  # one row, scaled by min(1, C / 13)
    >>> round(float(per_sample_norms({k: t[None] for k, t in total.items()})[0]), 6)
    1.0
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "add_gaussian_noise",
    "clipped_sum",
    "noisy_mean",
    "per_sample_norms",
    "secure_standard_normal",
    "secure_uniform",
]


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _norm_dtype(grads: dict[str, Tensor]) -> torch.dtype:
    dtype = torch.float32
    for g in grads.values():
        dtype = torch.promote_types(dtype, g.dtype)
    return dtype


def per_sample_norms(grads: dict[str, Tensor]) -> Tensor:
    """||g_i||_2 over the joint vector of all parameters: sqrt(sum_p ||g_{i,p}||^2), shape [B].

    grads: {name: [B, *param.shape]}, all with the same B (B = 0 gives an empty vector).
    Computed in at least float32.
    """
    if not grads:
        raise ValueError("per_sample_norms needs at least one gradient tensor")
    sizes = {int(g.shape[0]) for g in grads.values()}
    if len(sizes) != 1:
        raise ValueError(f"per-sample gradients disagree on the batch size: {sorted(sizes)}")
    dtype = _norm_dtype(grads)
    per_param = [
        torch.linalg.vector_norm(g.flatten(start_dim=1).to(dtype), dim=1) for g in grads.values()
    ]
    return torch.linalg.vector_norm(torch.stack(per_param, dim=1), dim=1)


def _clip_factors(grads: dict[str, Tensor], clip_norm: float) -> Tensor:
    """min(1, C / ||g_i||) per sample, [B]; 1 for a zero gradient."""
    _check_positive("clip_norm", clip_norm)
    norms = per_sample_norms(grads)
    tiny = torch.finfo(norms.dtype).tiny
    return (clip_norm / norms.clamp(min=tiny)).clamp(max=1.0)


def clipped_sum(grads: dict[str, Tensor], *, clip_norm: float) -> dict[str, Tensor]:
    """sum_i g_i * min(1, C / ||g_i||_2): the clipped per-sample gradients summed over the batch,
    {name: [*param.shape]}. Its L2 sensitivity to adding or removing one example is C. An
    empty batch (B = 0) gives zeros."""
    factors = _clip_factors(grads, clip_norm)
    return {
        name: torch.tensordot(factors.to(g.dtype), g, dims=([0], [0])) for name, g in grads.items()
    }


def secure_uniform(n: int) -> Tensor:
    """n uniforms in (0, 1), float64, from the OS's cryptographically secure source
    (os.urandom): 53 random bits each, centred in their cell, (k + 1/2) / 2^53."""
    import os

    raw = torch.frombuffer(bytearray(os.urandom(8 * max(1, n))), dtype=torch.int64)[:n]
    return (((raw >> 11) & ((1 << 53) - 1)).to(torch.float64) + 0.5) / float(1 << 53)


def secure_standard_normal(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """N(0, 1) samples from the OS's cryptographically secure source (os.urandom), for anyone
    releasing prompts (Opacus' `secure_mode` idea; not seeded, not reproducible).

    Box-Muller on 53-bit uniforms in float64; as Opacus does after Holohan & Braghin (2021,
    arXiv 2107.10138), each value is the normalised sum of two draws, which blurs the
    floating-point structure of a single Box-Muller sample.
    """
    n = max(1, math.prod(shape))
    uniform = secure_uniform(4 * n).view(4, n)
    radius = torch.sqrt(-2.0 * torch.log(uniform[0::2]))
    normal = radius * torch.cos(2.0 * math.pi * uniform[1::2])  # [2, n], two N(0, 1) draws
    return (normal.sum(0) / math.sqrt(2.0))[: math.prod(shape)].reshape(shape).to(dtype)


def add_gaussian_noise(
    total: dict[str, Tensor],
    *,
    noise_multiplier: float,
    clip_norm: float,
    generator: torch.Generator | None,
) -> dict[str, Tensor]:
    """total + N(0, (sigma * C)^2) independently on every coordinate (Abadi et al. 2016, Alg. 1,
    "add noise"), for a sum whose L2 sensitivity is C. Noise is drawn on the generator's device
    and moved to each tensor's device, over the names in sorted order; `generator=None` draws
    it from the secure source (`secure_standard_normal`). sigma = 0 adds nothing but still
    returns new tensors."""
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    _check_positive("clip_norm", clip_norm)
    std = noise_multiplier * clip_norm
    noisy: dict[str, Tensor] = {}
    for name in sorted(total):
        t = total[name]
        if generator is None:
            noise = secure_standard_normal(t.shape, t.dtype)
        else:
            noise = torch.randn(
                t.shape, generator=generator, device=generator.device, dtype=t.dtype
            )
        noisy[name] = t + std * noise.to(t.device)
    return {name: noisy[name] for name in total}


def noisy_mean(
    total: dict[str, Tensor],
    *,
    noise_multiplier: float,
    clip_norm: float,
    expected_batch: float,
    generator: torch.Generator | None,
) -> dict[str, Tensor]:
    """(total + N(0, sigma^2 C^2 I)) / E[B] for a clipped sum `total` of sensitivity C: the
    noisy step gradient, whether the sum is one client's (client noise) or the sum over the
    clients of a step (server noise, E[B] then the expected total batch). The noise on each
    coordinate of the mean has std sigma * C / E[B]. Abadi et al. 2016, Alg. 1."""
    _check_positive("expected_batch", expected_batch)
    noisy = add_gaussian_noise(
        total, noise_multiplier=noise_multiplier, clip_norm=clip_norm, generator=generator
    )
    return {name: t / expected_batch for name, t in noisy.items()}
