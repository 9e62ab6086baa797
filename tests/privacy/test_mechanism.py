"""Clipping, summing and noising of per-sample gradients (Abadi et al. 2016, Alg. 1)."""

from __future__ import annotations

import math

import pytest
import torch

from fpl_bench.privacy.mechanism import (
    add_gaussian_noise,
    clipped_sum,
    noisy_mean,
    per_sample_norms,
)


def random_grads(batch: int = 16, scale: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": scale * torch.randn(batch, 4, 3, generator=g),
        "b": scale * torch.randn(batch, 5, generator=g),
    }


def clipped_rows(grads: dict[str, torch.Tensor], *, clip_norm: float) -> dict[str, torch.Tensor]:
    """Each record's contribution to `clipped_sum`, {name: [B, *shape]}: row i is the clipped
    sum of the batch holding record i alone."""
    n = len(next(iter(grads.values())))
    rows = [
        clipped_sum({k: g[i : i + 1] for k, g in grads.items()}, clip_norm=clip_norm)
        for i in range(n)
    ]
    return {k: torch.stack([row[k] for row in rows]) for k in grads}


def test_joint_norm_by_hand() -> None:
    grads = {"a": torch.tensor([[3.0, 4.0], [0.3, 0.4]]), "b": torch.tensor([[0, 0, 12.0]] * 2)}
    torch.testing.assert_close(per_sample_norms(grads), torch.tensor([13.0, math.sqrt(144.25)]))


def test_joint_clipping_by_hand() -> None:
    """(3, 4) and (0, 0, 12): joint norm 13, clipped to C = 1 -> every entry / 13. Per-tensor
    clipping would give (0.6, 0.8) and (0, 0, 1) instead, a joint norm of sqrt(2)."""
    grads = {"a": torch.tensor([[3.0, 4.0]]), "b": torch.tensor([[0.0, 0.0, 12.0]])}
    total = clipped_sum(grads, clip_norm=1.0)
    torch.testing.assert_close(total["a"], torch.tensor([3 / 13, 4 / 13]))
    torch.testing.assert_close(total["b"], torch.tensor([0.0, 0.0, 12 / 13]))
    half = clipped_sum(grads, clip_norm=6.5)
    torch.testing.assert_close(half["a"], torch.tensor([1.5, 2.0]))


def test_clipped_norms_at_most_c() -> None:
    """Each record's contribution to the clipped sum has joint norm <= C (exactly C when its
    gradient is longer); a record within C contributes its gradient unchanged, a zero one zero."""
    c = 1.0
    grads = random_grads(batch=32)
    grads["a"][:8] *= 100.0  # big
    grads["b"][:8] *= 100.0
    grads["a"][8:16] *= 1e-3  # small
    grads["b"][8:16] *= 1e-3
    grads["a"][16] = 0.0  # zero gradient stays zero
    grads["b"][16] = 0.0
    before = per_sample_norms(grads)
    clipped = clipped_rows(grads, clip_norm=c)
    after = per_sample_norms(clipped)
    assert torch.all(after <= c * (1 + 1e-6))
    torch.testing.assert_close(after[:8], torch.full((8,), c))
    for k in grads:
        torch.testing.assert_close(clipped[k][8:16], grads[k][8:16], rtol=0, atol=0)
        assert torch.equal(clipped[k][16], torch.zeros_like(clipped[k][16]))
    small = before <= c
    torch.testing.assert_close(after[small], before[small])


def test_clipped_sum_is_sum_of_clipped() -> None:
    """sum_i g_i * min(1, C / ||g_i||), the factor written out here from the joint norms."""
    grads = random_grads(batch=10, scale=2.0)
    factors = (0.7 / per_sample_norms(grads)).clamp(max=1.0)
    total = clipped_sum(grads, clip_norm=0.7)
    for k in grads:
        assert total[k].shape == grads[k].shape[1:]
        scaled = grads[k] * factors.reshape(-1, *([1] * (grads[k].dim() - 1)))
        torch.testing.assert_close(total[k], scaled.sum(0))
        torch.testing.assert_close(total[k], clipped_rows(grads, clip_norm=0.7)[k].sum(0))
    assert torch.linalg.vector_norm(torch.cat([t.flatten() for t in total.values()])) <= 7.0 + 1e-5


def test_inputs_not_modified() -> None:
    grads = random_grads(scale=50.0)
    copy = {k: v.clone() for k, v in grads.items()}
    total = clipped_sum(grads, clip_norm=1.0)
    kept = {k: v.clone() for k, v in total.items()}
    noisy_mean(
        total,
        clip_norm=1.0,
        noise_multiplier=1.0,
        expected_batch=8.0,
        generator=torch.Generator().manual_seed(0),
    )
    for k in grads:
        assert torch.equal(grads[k], copy[k])
        assert torch.equal(total[k], kept[k])


def test_noise_std_statistical() -> None:
    sigma, c = 1.3, 0.5
    total = {"w": torch.zeros(200_000, dtype=torch.float64)}
    noisy = add_gaussian_noise(
        total, noise_multiplier=sigma, clip_norm=c, generator=torch.Generator().manual_seed(0)
    )
    std = float(noisy["w"].std())
    assert abs(std - sigma * c) / (sigma * c) < 0.02
    assert abs(float(noisy["w"].mean())) < 0.01


def test_noise_seeded_and_order_independent() -> None:
    total = {"a": torch.zeros(5), "b": torch.zeros(3)}
    kw = {"noise_multiplier": 1.0, "clip_norm": 1.0}
    one = add_gaussian_noise(total, generator=torch.Generator().manual_seed(3), **kw)
    two = add_gaussian_noise(
        {"b": total["b"], "a": total["a"]}, generator=torch.Generator().manual_seed(3), **kw
    )
    assert list(two) == ["b", "a"]
    for k in total:
        assert torch.equal(one[k], two[k])
    assert add_gaussian_noise({}, generator=torch.Generator(), **kw) == {}


def test_noise_std_on_the_mean_is_sigma_c_over_expected_batch() -> None:
    """sigma = 2, C = 0.5, E[B] = 4: std 0.25 on every coordinate of the noisy mean."""
    zero = {"w": torch.zeros(200_000, dtype=torch.float64)}
    kw = {"noise_multiplier": 2.0, "clip_norm": 0.5}
    noisy = noisy_mean(zero, expected_batch=4.0, generator=torch.Generator().manual_seed(0), **kw)
    assert abs(float(noisy["w"].std()) - 0.25) / 0.25 < 0.02
    with pytest.raises(ValueError):
        noisy_mean(zero, expected_batch=0.0, generator=torch.Generator(), **kw)


def test_noisy_mean_divides_by_expected_batch() -> None:
    grads = random_grads(batch=6, scale=3.0)
    kw = {"clip_norm": 1.0, "noise_multiplier": 0.8}
    total = clipped_sum(grads, clip_norm=1.0)
    out = noisy_mean(total, expected_batch=10.0, generator=torch.Generator().manual_seed(1), **kw)
    noisy = add_gaussian_noise(
        total, noise_multiplier=0.8, clip_norm=1.0, generator=torch.Generator().manual_seed(1)
    )
    for k in grads:
        torch.testing.assert_close(out[k], noisy[k] / 10.0)  # not / 6, the realised batch
    quiet = noisy_mean(
        total, expected_batch=10.0, generator=torch.Generator(), **{**kw, "noise_multiplier": 0.0}
    )
    for k in grads:
        torch.testing.assert_close(quiet[k], total[k] / 10.0)


def test_empty_batch() -> None:
    grads = {"a": torch.zeros(0, 4, 3), "b": torch.zeros(0, 5)}
    assert per_sample_norms(grads).shape == (0,)
    total = clipped_sum(grads, clip_norm=1.0)
    assert torch.equal(total["a"], torch.zeros(4, 3)) and torch.equal(total["b"], torch.zeros(5))
    out = noisy_mean(
        total,
        clip_norm=1.0,
        noise_multiplier=1.0,
        expected_batch=2.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert out["a"].shape == (4, 3)
    assert float(out["a"].abs().sum()) > 0  # noise is still added


def test_dtype_kept() -> None:
    grads = {"a": torch.randn(4, 3, dtype=torch.float64)}
    assert clipped_sum(grads, clip_norm=1.0)["a"].dtype == torch.float64
    half = {"a": torch.randn(4, 3).to(torch.bfloat16)}
    assert per_sample_norms(half).dtype == torch.float32
    assert clipped_sum(half, clip_norm=0.1)["a"].dtype == torch.bfloat16


def test_secure_noise_has_the_formula_std_and_is_not_reproducible():
    from fpl_bench.privacy.mechanism import add_gaussian_noise, secure_standard_normal

    draws = secure_standard_normal((100_000,), torch.float64)
    assert abs(float(draws.mean())) < 0.02 and abs(float(draws.std()) - 1.0) < 0.02
    zero = {"g": torch.zeros(50_000)}
    a = add_gaussian_noise(zero, noise_multiplier=2.0, clip_norm=0.5, generator=None)["g"]
    b = add_gaussian_noise(zero, noise_multiplier=2.0, clip_norm=0.5, generator=None)["g"]
    assert abs(float(a.std()) - 1.0) < 0.03  # sigma * C
    assert not torch.equal(a, b)


def test_secure_uniforms_are_uniform_in_the_open_interval_and_not_reproducible():
    from fpl_bench.privacy.mechanism import secure_uniform

    u = secure_uniform(200_000)
    assert u.dtype == torch.float64 and u.shape == (200_000,)
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    # mean 1/2 and variance 1/12, each within 5 standard errors
    assert abs(float(u.mean()) - 0.5) < 5 * (1 / 12 / 200_000) ** 0.5
    assert abs(float(u.var()) - 1 / 12) < 5 * (1 / 180 / 200_000) ** 0.5
    deciles = torch.histc(u.float(), bins=10, min=0.0, max=1.0)
    assert (deciles - 20_000).abs().max() < 5 * (20_000 * 0.9) ** 0.5
    assert not torch.equal(u[:100], secure_uniform(100))
    assert secure_uniform(0).shape == (0,)
