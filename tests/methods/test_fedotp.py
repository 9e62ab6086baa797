"""FedOTP: OT logits against hand values, shapes, vmap, and exact per-sample gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fpl_bench.errors import UsageError
from fpl_bench.learners._base import EncodeContext, InitContext
from fpl_bench.learners.ot import OTPatch
from fpl_bench.method import method_from_name
from fpl_bench.privacy.per_sample import (
    client_step_gradients,
    step_gradients,
)
from fpl_bench.schemes.global_local import GlobalLocal


def FedOTP(**options):
    return method_from_name("fedotp", options)


D, P = 64, 64  # tiny CLIP: embed dim, patch tokens


def setup(tower, method, n_classes=None, seed=0):
    init = InitContext(tower=tower, generator=torch.Generator().manual_seed(seed))
    params, _ = method.init(init)
    classes = torch.arange(n_classes or tower.n_classes)
    return params, EncodeContext(tower=tower, class_idx=classes)


def random_tokens(*shape, seed=1):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_declares_global_shared_two_prompts_tokens_needed():
    assert GlobalLocal.shared == ("p_global",) and GlobalLocal.n_prompts == 2
    assert GlobalLocal.sync == "round" and OTPatch.needs_tokens and OTPatch.max_prompts is None


def test_init_gives_two_different_prompts(tiny_tower):
    params, _ = setup(tiny_tower, FedOTP())
    assert set(params) == {"p_global", "p_local"}
    assert params["p_global"].shape == params["p_local"].shape == (4, tiny_tower.width)
    assert not torch.equal(params["p_global"], params["p_local"])


def test_encode_stacks_both_prompts_text_features(tiny_tower):
    method = FedOTP()
    params, ctx = setup(tiny_tower, method, n_classes=3)
    enc = method.encode(params, {}, ctx)
    text = enc["text"]
    assert text.shape == (2, 3, D)
    torch.testing.assert_close(text[0], tiny_tower.encode(params["p_global"], ctx.class_idx))
    torch.testing.assert_close(text[1], tiny_tower.encode(params["p_local"], ctx.class_idx))


def test_logits_shapes_and_batch_equals_one_by_one_and_vmap(tiny_tower):
    method = FedOTP()
    params, ctx = setup(tiny_tower, method)
    enc = method.encode(params, {}, ctx)
    enc["text"]
    tokens = random_tokens(5, P, D)
    pooled = tokens.mean(1)
    batched = method.logits(enc, pooled, tokens, ctx)
    assert batched.shape == (5, tiny_tower.n_classes)
    single = method.logits(enc, pooled[0], tokens[0], ctx)
    assert single.shape == (tiny_tower.n_classes,)
    looped = torch.stack(
        [method.logits(enc, x, t, ctx) for x, t in zip(pooled, tokens, strict=True)]
    )
    torch.testing.assert_close(batched, looped)
    mapped = torch.func.vmap(lambda x, t: method.logits(enc, x, t, ctx))(pooled, tokens)
    torch.testing.assert_close(mapped, batched)


def test_identical_prompts_and_full_mass_give_the_mean_patch_cosine(tiny_tower):
    # Equal cost columns and top_percent = 1: the plan is 1 / (2 M) in every cell, so
    # logit_c = logit_scale * mean_m cos(x_m, t_c).
    method = FedOTP(top_percent=1.0, max_iter=1000, thresh=1e-7)
    params, ctx = setup(tiny_tower, method)
    params["p_local"] = params["p_global"].clone()
    enc = method.encode(params, {}, ctx)
    text = enc["text"]
    tokens = random_tokens(3, P, D)
    logits = method.logits(enc, tokens.mean(1), tokens, ctx)
    expected = tiny_tower.logit_scale * (tokens @ text[0].T).mean(1)  # [3, n]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_identical_patches_give_top_percent_times_the_mean_prompt_cosine(tiny_tower):
    # Every patch the same token x: the plan is uniform, top_percent / (2 M) per cell, so
    # logit_c = top_percent * logit_scale * (cos(x, t_1c) + cos(x, t_2c)) / 2.
    method = FedOTP(top_percent=0.8)
    params, ctx = setup(tiny_tower, method)
    enc = method.encode(params, {}, ctx)
    text = enc["text"]
    token = random_tokens(D)
    logits = method.logits(enc, token, token.expand(P, D), ctx)
    expected = 0.8 * tiny_tower.logit_scale * (text @ token).mean(0)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def _clustered(n_images, n_classes, *, seed, patches=P):
    """Text features [2, n, D] and patch tokens [B, P, D] near one class each (with noise), so
    that one class stands out per image as in a trained model, and classes 0 and 1 identical
    (exact ties)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, D, generator=g)
    centres[1] = centres[0]
    text = F.normalize(centres + 0.3 * torch.randn(2, 1, D, generator=g), dim=-1)
    text[:, 1] = text[:, 0]
    labels = torch.randint(0, n_classes, (n_images,), generator=g)
    tokens = centres[labels].unsqueeze(1) + 3.0 * torch.randn(n_images, patches, D, generator=g)
    return text, F.normalize(tokens, dim=-1)


@pytest.mark.parametrize(
    ("top_percent", "per_call", "patches"), [(0.8, 96, P), (1.0, 7, P), (0.8, 7, 49)]
)
def test_predict_is_the_argmax_of_logits_from_fewer_problems(
    tiny_tower, monkeypatch, top_percent, per_call, patches
):
    # per_call: images per chunk (7: 14 chunks, the last one of 5 images); 49 patches (ViT-B/32's
    # grid) leave scalar tails in the solver's vectorised loops at most batch sizes
    monkeypatch.setattr("fpl_bench.learners.ot._EVAL_ELEMENTS", per_call * 20 * patches * 2)
    learner = FedOTP(top_percent=top_percent).learner
    ctx = EncodeContext(tower=tiny_tower, class_idx=torch.arange(20))
    text, tokens = _clustered(96, 20, seed=3, patches=patches)
    full = learner.logits(text, tokens.mean(1), tokens, ctx)  # [B, n]
    solved = []
    plan = OTPatch._plan

    def counting(self, sim):
        solved.append(sim.detach().clone())
        return plan(self, sim)

    monkeypatch.setattr(OTPatch, "_plan", counting)
    predicted = learner.predict(text, tokens.mean(1), tokens, ctx)
    assert torch.equal(predicted, full.argmax(-1))
    assert (predicted == 0).any() and not (predicted == 1).any()  # ties go to the first class
    assert len(solved) == 2 * -(-96 // per_call)  # the first classes, then the rest, per chunk
    n_solved = sum(s.shape[0] for s in solved)
    assert 96 <= n_solved < 96 * 20 / 2  # one per image, then only the classes still in reach
    # every solved problem gives bit-for-bit the logit of the full computation
    sim = OTPatch._similarities(text, tokens)
    for s in solved:
        hits = (sim.unsqueeze(2) == s).flatten(-2).all(-1)  # [B, n, K]
        b, c, k = hits.nonzero(as_tuple=True)
        assert len(k) >= s.shape[0]
        again = OTPatch._score(plan(learner, s), s, ctx)
        assert torch.equal(again[k], full[b, c])


def test_predict_solves_every_class_at_once_where_none_stands_out(tiny_tower, monkeypatch):
    # Random features: the first classes' logits could rule out almost nothing, so each chunk is
    # one Sinkhorn call over all its problems (no first pass), with the same argmax.
    monkeypatch.setattr("fpl_bench.learners.ot._EVAL_ELEMENTS", 24 * 20 * 49 * 2)
    learner = FedOTP().learner
    ctx = EncodeContext(tower=tiny_tower, class_idx=torch.arange(20))
    text, tokens = random_tokens(2, 20, D, seed=7), random_tokens(48, 49, D, seed=8)
    full = learner.logits(text, tokens.mean(1), tokens, ctx)
    calls = []
    plan = OTPatch._plan

    def counting(self, sim):
        calls.append(sim.shape[:-2].numel())
        return plan(self, sim)

    monkeypatch.setattr(OTPatch, "_plan", counting)
    assert torch.equal(learner.predict(text, tokens.mean(1), tokens, ctx), full.argmax(-1))
    assert calls == [24 * 20, 24 * 20]


def test_predict_with_non_finite_tokens_is_the_argmax_of_logits(tiny_tower):
    learner = FedOTP().learner
    ctx = EncodeContext(tower=tiny_tower, class_idx=torch.arange(6))
    text, tokens = _clustered(5, 6, seed=9)
    tokens[2, 3, 0] = float("nan")
    full = learner.logits(text, tokens.mean(1), tokens, ctx)
    assert torch.equal(learner.predict(text, tokens.mean(1), tokens, ctx), full.argmax(-1))


def test_logit_bound_holds_and_is_reached_by_identical_patches(tiny_tower):
    learner = FedOTP(top_percent=0.8).learner
    ctx = EncodeContext(tower=tiny_tower, class_idx=torch.arange(20))
    text, tokens = _clustered(32, 20, seed=6)
    sim = OTPatch._similarities(text, tokens)
    bound, slack = learner._logit_bound(sim, ctx)
    logits = learner.logits(text, tokens.mean(1), tokens, ctx)
    assert (logits <= bound).all()
    assert slack == pytest.approx(1e-3 * tiny_tower.logit_scale * 0.8 * float(sim.abs().max()))
    _, slack16 = learner._logit_bound(sim.bfloat16(), ctx)  # rounding of bf16: skip nothing
    assert slack16 >= 2 * tiny_tower.logit_scale * 0.8 * float(sim.abs().max()) * 0.99
    # identical patches: the plan is uniform, logit = 0.8 s mean_n cos = the bound
    same = tokens[:, :1].expand(-1, P, -1)
    sim = OTPatch._similarities(text, same)
    bound, _ = learner._logit_bound(sim, ctx)
    torch.testing.assert_close(learner.logits(text, same.mean(1), same, ctx), bound)


def test_predict_without_a_clear_winner_solves_everything_and_agrees(tiny_tower):
    learner = FedOTP().learner
    ctx = EncodeContext(tower=tiny_tower, class_idx=torch.arange(6))
    text = F.normalize(torch.ones(2, 6, D) + 1e-3 * random_tokens(2, 6, D, seed=4), dim=-1)
    tokens = random_tokens(7, P, D, seed=5)
    full = learner.logits(text, tokens.mean(1), tokens, ctx)
    assert torch.equal(learner.predict(text, tokens.mean(1), tokens, ctx), full.argmax(-1))
    one = learner.predict(text, tokens[:1].mean(1), tokens[:1], ctx)
    assert one.shape == (1,) and one[0] == full[0].argmax()


def test_vmap_grad_per_sample_equals_a_loop_of_autograd(tiny_tower):
    method = FedOTP()
    params, ctx = setup(tiny_tower, method, n_classes=4)
    tokens = random_tokens(3, P, D, seed=2)
    pooled = tokens.mean(1)
    labels = torch.tensor([0, 3, 1])

    def loss(p, x, t, y):
        return method.sample_loss(method.encode(p, {}, ctx), x, t, y, ctx)

    with sdpa_kernel([SDPBackend.MATH]):
        mapped = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0, 0))(
            params, pooled, tokens, labels
        )
    step = [
        lambda p: method.encode(p, {}, ctx),
        lambda z, x, t, y: method.sample_loss(z, x, t, y, ctx),
        params,
        (pooled, tokens, labels),
    ]
    private = step_gradients(*step, per_sample=True)
    driver, losses = private.data, private.losses
    mean = step_gradients(*step, per_sample=False).data
    for i in range(3):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        li = loss(p, pooled[i], tokens[i], labels[i])
        grads = dict(zip(p, torch.autograd.grad(li, list(p.values())), strict=True))
        for name, g in grads.items():
            assert g.abs().sum() > 0, name
            torch.testing.assert_close(mapped[name][i], g, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(driver[name][i], g, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(losses[i], li.detach())
    for name in params:
        torch.testing.assert_close(mean[name], driver[name].mean(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("per_sample", [True, False])
def test_plans_solved_for_the_batch_outside_vmap_give_the_same_gradients(tiny_tower, per_sample):
    """The training plans come from `batch_constants` (early exit, outside vmap): the same
    gradients and losses as solving them inside the vmapped loss (max_iter, frozen), for one
    client and for clients stacked with padding."""
    method = FedOTP()
    assert method.has_batch_constants
    params, ctx = setup(tiny_tower, method, n_classes=5)
    tokens = random_tokens(4, P, D, seed=3)
    batch = (tokens.mean(1), tokens, torch.tensor([0, 4, 2, 2]))

    def encode(p, e=None):
        return method.encode(p, {}, ctx)

    def loss(z, x, t, y, *given):
        return method.sample_loss(z, x, t, y, ctx, *given)

    def constants(z, x, t, y):
        return method.batch_constants(z, t, ctx)

    plans = constants(encode(params), *batch)
    assert plans.shape == (4, 5, P, 2)
    inside = step_gradients(encode, loss, params, batch, per_sample=per_sample)
    given = step_gradients(encode, loss, params, batch, per_sample=per_sample, constants=constants)
    for name in params:
        assert inside.data[name].abs().sum() > 0
        torch.testing.assert_close(given.data[name], inside.data[name], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(given.losses, inside.losses)

    # two clients: client 1 has the first 2 samples (padded to 4), its params moved a bit
    other = {k: v + 0.01 * torch.ones_like(v) for k, v in params.items()}
    stacked = {k: torch.stack([params[k], other[k]]) for k in params}
    padded = tuple(torch.stack([b, torch.cat([b[:2], torch.zeros_like(b[2:])])]) for b in batch)
    clients = client_step_gradients(
        encode, loss, stacked, {}, padded, [4, 2], per_sample=per_sample, constants=constants
    )
    second = step_gradients(encode, loss, other, tuple(b[:2] for b in batch), per_sample=per_sample)
    for name in params:
        first_k = clients.data[name][0]
        second_k = clients.data[name][1, :2] if per_sample else clients.data[name][1]
        # a stacked tower forward rounds differently in float32 (as in tests/test_speed.py)
        torch.testing.assert_close(first_k, inside.data[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(second_k, second.data[name], rtol=1e-4, atol=1e-6)


def test_missing_tokens_are_an_error(tiny_tower):
    method = FedOTP()
    params, ctx = setup(tiny_tower, method)
    with pytest.raises(ValueError, match="patch tokens"):
        method.logits(method.encode(params, {}, ctx), torch.zeros(2, D), None, ctx)


@pytest.mark.parametrize(
    ("option", "value"),
    [("eps", 0.0), ("top_percent", 0.0), ("top_percent", 1.2), ("max_iter", 0), ("thresh", -1.0)],
)
def test_bad_hyperparameters_are_usage_errors(option, value):
    with pytest.raises(UsageError, match=f"fedotp.{option}="):
        FedOTP(**{option: value})


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_predict_is_the_argmax_of_logits_in_other_precisions(tiny_tower, dtype):
    """The bound and the solved logits keep the similarities' precision (float64 stays float64:
    the bound is no longer narrowed to float32; bf16's is widened)."""
    learner = FedOTP(top_percent=0.8).learner
    ctx = EncodeContext(tower=tiny_tower, class_idx=torch.arange(20))
    text, tokens = _clustered(24, 20, seed=5)
    text, tokens = text.to(dtype), tokens.to(dtype)
    full = learner.logits(text, tokens.mean(1), tokens, ctx)
    assert full.dtype == dtype
    assert torch.equal(learner.predict(text, tokens.mean(1), tokens, ctx), full.argmax(-1))
