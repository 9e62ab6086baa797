"""step_gradients, per sample (private steps) and of the mean loss, against a loop of ordinary
backward passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_bench.privacy.per_sample import step_gradients


class ToyTower:
    """A causal-attention-like encoder: prompt [n_ctx, W] + per-class tokens -> features [n_cls, D]."""

    def __init__(self, n_cls: int, n_ctx: int, width: int, dim: int, dtype: torch.dtype) -> None:
        g = torch.Generator().manual_seed(1)
        self.cls_tok = torch.randn(n_cls, 2, width, generator=g, dtype=dtype)
        self.wq = torch.randn(width, width, generator=g, dtype=dtype) / width**0.5
        self.wk = torch.randn(width, width, generator=g, dtype=dtype) / width**0.5
        self.wv = torch.randn(width, width, generator=g, dtype=dtype) / width**0.5
        self.proj = torch.randn(width, dim, generator=g, dtype=dtype) / width**0.5
        seq = n_ctx + 2
        self.mask = torch.full((seq, seq), float("-inf"), dtype=dtype).triu(1)

    def __call__(self, ctx: Tensor) -> Tensor:
        n_cls = self.cls_tok.shape[0]
        x = torch.cat([ctx.expand(n_cls, *ctx.shape), self.cls_tok], dim=1)  # [n_cls, S, W]
        att = (x @ self.wq) @ (x @ self.wk).transpose(1, 2) / x.shape[-1] ** 0.5 + self.mask
        x = x + torch.softmax(att, dim=-1) @ (x @ self.wv)
        x = F.layer_norm(x, x.shape[-1:])
        return F.normalize(x[:, -1] @ self.proj, dim=-1)  # EOT-like last position


LOGIT_SCALE = 20.0


def cosine_ce(text: Tensor, image: Tensor, label: Tensor) -> Tensor:
    logits = LOGIT_SCALE * F.normalize(image, dim=-1) @ text.T
    return F.cross_entropy(logits.unsqueeze(0), label.unsqueeze(0))


def make_case(n_cls: int, batch: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tower = ToyTower(n_cls, n_ctx=4, width=16, dim=8, dtype=dtype)
    params = {"ctx": (0.5 * torch.randn(4, 16, generator=g, dtype=dtype)).requires_grad_()}
    images = torch.randn(batch, 8, generator=g, dtype=dtype)
    labels = torch.randint(0, n_cls, (batch,), generator=g)

    def encode(p: dict[str, Tensor]) -> Tensor:
        return tower(p["ctx"])

    def sample_loss(z: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return cosine_ce(z, x, y)

    return encode, sample_loss, params, (images, labels)


def per_sample_step(encode, sample_loss, params, batch, **kw):
    """A private step's per-sample gradients {name: [B, *shape]} and losses [B] (no prior)."""
    out = step_gradients(encode, sample_loss, params, batch, per_sample=True, **kw)
    assert out.prior is None
    return out.data, out.losses


def mean_step(encode, sample_loss, params, batch):
    """A non-private step's gradient of the mean loss {name: [*shape]} and losses [B]."""
    out = step_gradients(encode, sample_loss, params, batch, per_sample=False)
    assert out.prior is None
    return out.data, out.losses


def loop_grads(encode, sample_loss, params, batch):
    """Reference: B separate forward/backward passes through the whole model."""
    out: dict[str, list[Tensor]] = {k: [] for k in params}
    losses = []
    for i in range(batch[0].shape[0]):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        loss = sample_loss(encode(leaves), *(t[i] for t in batch))
        grads = torch.autograd.grad(loss, list(leaves.values()))
        for k, gr in zip(leaves, grads, strict=True):
            out[k].append(gr)
        losses.append(loss.detach())
    return {k: torch.stack(v) for k, v in out.items()}, torch.stack(losses)


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_matches_loop(dtype: torch.dtype, tol: float) -> None:
    encode, sample_loss, params, batch = make_case(n_cls=5, batch=7, dtype=dtype)
    grads, losses = per_sample_step(encode, sample_loss, params, batch)
    ref, ref_losses = loop_grads(encode, sample_loss, params, batch)
    assert grads["ctx"].shape == (7, 4, 16)
    assert grads["ctx"].dtype == dtype
    assert not grads["ctx"].requires_grad
    assert rel_err(grads["ctx"], ref["ctx"]) < tol
    assert rel_err(losses, ref_losses) < tol
    # each row differs: the samples are not mixed
    assert rel_err(grads["ctx"][0], grads["ctx"][1]) > 1e-2


def test_batch_size_equals_class_count() -> None:
    encode, sample_loss, params, batch = make_case(n_cls=6, batch=6, dtype=torch.float64, seed=3)
    grads, _ = per_sample_step(encode, sample_loss, params, batch)
    ref, _ = loop_grads(encode, sample_loss, params, batch)
    assert rel_err(grads["ctx"], ref["ctx"]) < 1e-5


def test_params_without_requires_grad() -> None:
    encode, sample_loss, params, batch = make_case(n_cls=3, batch=4, dtype=torch.float64)
    frozen = {k: v.detach() for k, v in params.items()}
    a, _ = per_sample_step(encode, sample_loss, frozen, batch)
    b, _ = per_sample_step(encode, sample_loss, params, batch)
    torch.testing.assert_close(a["ctx"], b["ctx"])
    assert params["ctx"].grad is None


def dict_case(batch: int = 5, n_cls: int = 4):
    """Two params (a global and a local prompt) and a dict-valued Z (two feature sets)."""
    dtype = torch.float64
    g = torch.Generator().manual_seed(7)
    tower = ToyTower(n_cls, n_ctx=3, width=12, dim=6, dtype=dtype)
    params = {
        "p_global": torch.randn(3, 12, generator=g, dtype=dtype).requires_grad_(),
        "p_local": torch.randn(3, 12, generator=g, dtype=dtype),
    }
    images = torch.randn(batch, 6, generator=g, dtype=dtype)
    labels = torch.randint(0, n_cls, (batch,), generator=g)
    weights = torch.rand(batch, generator=g, dtype=dtype)

    def encode(p: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"g": tower(p["p_global"]), "l": tower(p["p_global"] + 0.5 * p["p_local"])}

    def sample_loss(z: dict[str, Tensor], x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        return cosine_ce(z["g"], x, y) + w * cosine_ce(z["l"], x, y)

    return encode, sample_loss, params, (images, labels, weights)


def test_dict_valued_z_and_two_params() -> None:
    encode, sample_loss, params, batch = dict_case()
    grads, losses = per_sample_step(encode, sample_loss, params, batch)
    ref, ref_losses = loop_grads(encode, sample_loss, params, batch)
    assert set(grads) == {"p_global", "p_local"}
    for k in params:
        assert grads[k].shape == (5, *params[k].shape)
        assert rel_err(grads[k], ref[k]) < 1e-5
    assert rel_err(losses, ref_losses) < 1e-10


def test_mean_step_is_mean_of_per_sample_and_autograd() -> None:
    encode, sample_loss, params, batch = dict_case()
    mean, losses = mean_step(encode, sample_loss, params, batch)
    per, per_losses = per_sample_step(encode, sample_loss, params, batch)
    torch.testing.assert_close(losses, per_losses)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    z = encode(leaves)
    total = torch.stack(
        [sample_loss(z, *(t[i] for t in batch)) for i in range(batch[0].shape[0])]
    ).mean()
    auto = torch.autograd.grad(total, list(leaves.values()))
    for (k, a), b in zip(leaves.items(), auto, strict=True):
        del a
        torch.testing.assert_close(mean[k], per[k].mean(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(mean[k], b, rtol=1e-9, atol=1e-12)


def test_chunked_equals_unchunked() -> None:
    encode, sample_loss, params, batch = make_case(n_cls=4, batch=9, dtype=torch.float64)
    a, _ = per_sample_step(encode, sample_loss, params, batch)
    b, _ = per_sample_step(encode, sample_loss, params, batch, chunk_size=4)
    torch.testing.assert_close(a["ctx"], b["ctx"])


def test_empty_batch() -> None:
    encode, sample_loss, params, batch = make_case(n_cls=3, batch=0, dtype=torch.float32)
    grads, losses = per_sample_step(encode, sample_loss, params, batch)
    assert grads["ctx"].shape == (0, 4, 16) and losses.shape == (0,)
    mean, losses = mean_step(encode, sample_loss, params, batch)
    assert torch.equal(mean["ctx"], torch.zeros(4, 16)) and losses.shape == (0,)


def test_real_text_tower(tiny_tower) -> None:
    """The open_clip text transformer (causal attn_mask buffer) under vmap(vjp_fn)."""
    pytest.importorskip("open_clip")
    tower = tiny_tower
    g = torch.Generator().manual_seed(0)
    n_cls = tower.n_classes
    params = {"ctx": 0.02 * torch.randn(4, tower.width, generator=g)}
    images = torch.randn(n_cls, tower.encode(params["ctx"]).shape[-1], generator=g)
    labels = torch.arange(n_cls)  # batch size == class count

    def encode(p: dict[str, Tensor]) -> Tensor:
        return tower.encode(p["ctx"])

    grads, _ = per_sample_step(encode, cosine_ce, params, (images, labels))
    ref, _ = loop_grads(encode, cosine_ce, params, (images, labels))
    assert rel_err(grads["ctx"], ref["ctx"]) < 1e-4


@pytest.mark.parametrize("n", [5, 0])
def test_step_gradients_prior_rides_with_the_per_sample_backward(n: int) -> None:
    """With a prior (reads Z and params, no record), step_gradients gives the per-sample data
    gradients and the prior's gradient J^T dprior/dZ + dprior/dparams apart; the prior's
    cotangent goes through the per-sample backward as one more row. Both against autograd."""
    encode, sample_loss, params, batch = dict_case()
    batch = tuple(t[:n] for t in batch)
    anchor = {k: 0.3 * torch.ones_like(v) for k, v in params.items()}

    def prior(z: dict[str, Tensor], p: dict[str, Tensor]) -> Tensor:
        return 2.0 * (z["g"] * z["l"]).sum() + sum(((p[k] - anchor[k]) ** 2).sum() for k in p)

    out = step_gradients(encode, sample_loss, params, batch, per_sample=True, prior=prior)
    ref = loop_grads(encode, sample_loss, params, batch)[0] if n else {}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    want = torch.autograd.grad(prior(encode(leaves), leaves), list(leaves.values()))
    assert out.prior is not None
    for k, w in zip(leaves, want, strict=True):
        assert out.data[k].shape == (n, *params[k].shape)
        if n:
            assert rel_err(out.data[k], ref[k]) < 1e-5
        torch.testing.assert_close(out.prior[k], w, rtol=1e-9, atol=1e-12)
