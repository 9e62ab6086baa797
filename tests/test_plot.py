"""PLOT against its paper and reference, written out here: balanced Sinkhorn (T 1 = 1/M,
T^T 1 = 1/N) as a textbook loop, the class score logit_scale * sum T S one image and class at a
time, hand values; the N prompts (the scheme's and the learner's own N - 1) through one tower
forward; exact per-sample gradients of all N prompts in float64 (one backward per sample);
which scheme shares them; runs through the driver and by name through the CLI."""

import math

import pytest
import torch
import torch.nn.functional as F

from fpl_bench.driver import FederatedRun, NoisePlan, Schedule
from fpl_bench.errors import UsageError
from fpl_bench.learners._base import EncodeContext, InitContext
from fpl_bench.learners.plot import PROMPTS
from fpl_bench.method import method_from_name
from fpl_bench.ot import sinkhorn
from fpl_bench.privacy.per_sample import step_gradients
from fpl_bench.spec import build_spec
from tests.test_cocoop import tower64  # noqa: F401  (a float64 tiny tower, module fixture)
from tests.test_driver import make_federation

F64 = torch.float64
TIGHT = {"max_iter": 5000, "thresh": 1e-13}  # options that run the solver to convergence
CONVERGED = {"top_percent": 1.0, "balanced": True, "check_every": 5, **TIGHT}


def textbook_sinkhorn(cost, *, eps, iters=None, tol=1e-13):
    """Balanced entropic OT [..., M, N] with uniform marginals: r = a / (K c), c = b / (K^T r)
    from c = 1 (Cuturi 2013; the reference's `CustomCLIP.Sinkhorn`), `iters` steps exactly, or
    until every row sum is within tol of a, relatively."""
    m, n = cost.shape[-2:]
    kernel = torch.exp(-cost / eps)
    c = torch.ones(*cost.shape[:-2], n, dtype=cost.dtype)
    for _ in range(iters or 100_000):
        r = (1.0 / m) / (kernel @ c[..., None])[..., 0]
        c = (1.0 / n) / (kernel.mT @ r[..., None])[..., 0]
        plan = r[..., None] * kernel * c[..., None, :]
        if iters is None and float((m * plan.sum(-1) - 1.0).abs().max()) < tol:
            return plan
    assert iters is not None, "no convergence"
    return plan


def log_sinkhorn(cost, *, eps, tol=1e-13):
    """The same problem in the log domain (f, g), for costs whose kernel leaves the float range."""
    m, n = cost.shape[-2:]
    g = torch.zeros(*cost.shape[:-2], n, dtype=cost.dtype)
    for _ in range(100_000):
        f = -math.log(m) - torch.logsumexp(g[..., None, :] - cost / eps, dim=-1)
        g = -math.log(n) - torch.logsumexp(f[..., :, None] - cost / eps, dim=-2)
        plan = torch.exp(f[..., :, None] + g[..., None, :] - cost / eps)
        if float((m * plan.sum(-1) - 1.0).abs().max()) < tol:
            return plan
    raise AssertionError("no convergence")


def reference_plans(sim, *, eps=0.1, max_iter=100, thresh=1e-2):
    """The reference's loop with its stopping rule (on the row scaling r) and `break`, for each
    problem of sim [P, M, N] alone (the reference stops its whole batch on the batch mean)."""
    m, n = sim.shape[-2:]
    kernel = torch.exp(-(1.0 - sim) / eps)
    r, c = (
        torch.ones(*sim.shape[:-1], dtype=sim.dtype),
        torch.ones(*sim.shape[:-2], n, dtype=sim.dtype),
    )
    done = torch.zeros(sim.shape[0], dtype=torch.bool)
    plans = torch.empty_like(sim)
    for _ in range(max_iter):
        r_prev = r
        r = (1.0 / m) / (kernel @ c[..., None])[..., 0]
        c = (1.0 / n) / (kernel.mT @ r[..., None])[..., 0]
        stop = ((r - r_prev).abs().mean(-1) < thresh) & ~done
        plans[stop] = (r[..., None] * kernel * c[..., None, :])[stop]
        done |= stop
    plans[~done] = (r[..., None] * kernel * c[..., None, :])[~done]
    return plans


def clip_like_similarities(*shape, seed=0, centre=0.2, spread=0.05):
    """Cosines around 0.2, as CLIP's patch-text similarities are."""
    gen = torch.Generator().manual_seed(seed)
    return centre + spread * torch.randn(*shape, generator=gen, dtype=F64)


# -- the balanced transport (fpl_bench.ot, balanced=True) ----------------------------------


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.5])
def test_balanced_plan_is_the_textbook_sinkhorns_with_both_marginals_exact(eps):
    cost = 1.0 - clip_like_similarities(6, 9, 4, seed=1, spread=0.2)
    plan = sinkhorn(cost, eps=eps, **CONVERGED)
    torch.testing.assert_close(plan, textbook_sinkhorn(cost, eps=eps), rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(plan.sum(-1), torch.full((6, 9), 1 / 9, dtype=F64))
    torch.testing.assert_close(plan.sum(-2), torch.full((6, 4), 1 / 4, dtype=F64))
    # batched = one by one = vmapped (the per-sample loss runs it under vmap)
    one = torch.stack([sinkhorn(c, eps=eps, **CONVERGED) for c in cost])
    mapped = torch.func.vmap(
        lambda c: sinkhorn(c, eps=eps, top_percent=1.0, balanced=True, max_iter=200, thresh=1e-13)
    )(cost)
    torch.testing.assert_close(one, plan, rtol=0, atol=0)
    torch.testing.assert_close(mapped, plan, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("eps", [0.1, 0.01, 0.005])
@pytest.mark.parametrize(("dtype", "tol"), [(F64, 1e-10), (torch.float32, 3e-4)])
def test_balanced_plan_in_both_forms_is_the_log_domain_textbooks(eps, dtype, tol):
    """Costs over [0, 2]: the scaling form at eps 0.1; below, K = exp(-C / eps) underflows
    (C / eps up to 400) and the solver's log domain takes over. tol: relative to 1 / (M N);
    float32 rounds potentials of size 400 to ~1e-4."""
    gen = torch.Generator().manual_seed(2)
    cost = 2.0 * torch.rand(3, 7, 4, generator=gen, dtype=F64)
    plan = sinkhorn(cost.to(dtype), eps=eps, **{**CONVERGED, "thresh": 1e-12})
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.double(), log_sinkhorn(cost, eps=eps), rtol=0, atol=tol / 28)


@pytest.mark.parametrize("steps", [1, 2, 3, 7])
def test_balanced_iterates_are_the_references(steps):
    """Without the stopping rule, k iterations give the reference's plan after k iterations."""
    cost = 1.0 - clip_like_similarities(5, 49, 4, seed=3)
    plan = sinkhorn(cost, eps=0.1, top_percent=1.0, balanced=True, max_iter=steps, thresh=1e-300)
    want = textbook_sinkhorn(cost, eps=0.1, iters=steps)
    torch.testing.assert_close(plan, want, rtol=1e-12, atol=0)


def test_partial_iteration_at_full_mass_is_not_yet_balanced_after_100_iterations():
    """Why `balanced`: FedOTP's capped iteration (u <= 1) has the same minimiser at top_percent
    = 1 but at CLIP-like costs is still far from it after the reference's 100 iterations."""
    cost = 1.0 - clip_like_similarities(16, 49, 4, seed=4)
    row = torch.full((16, 49), 1 / 49, dtype=F64)
    options = {"eps": 0.1, "top_percent": 1.0, "max_iter": 100, "thresh": 1e-300}
    capped = sinkhorn(cost, **options)
    balanced = sinkhorn(cost, balanced=True, **options)
    assert float(((capped.sum(-1) - row) / row).abs().max()) > 0.02
    torch.testing.assert_close(balanced.sum(-1), row, rtol=1e-10, atol=0)


def test_default_stopping_is_as_close_to_the_converged_score_as_the_references():
    """The shared rule (mean |v - v_prev| < 1e-3, prompt side) for the reference's (mean
    |u - u_prev| < 1e-2, patch side): the score sum T S within 1e-4 of the converged plan's,
    as the reference's is, at CLIP-like similarities."""
    for seed, (centre, spread) in enumerate([(0.2, 0.05), (0.2, 0.15), (0.5, 0.1)]):
        sim = clip_like_similarities(64, 49, 4, seed=seed, centre=centre, spread=spread)
        converged = sinkhorn(1.0 - sim, **CONVERGED)
        ours = sinkhorn(1.0 - sim, top_percent=1.0, balanced=True, max_iter=100, thresh=1e-3)
        theirs = reference_plans(sim)
        exact = (converged * sim).sum((-2, -1))
        assert float(((ours * sim).sum((-2, -1)) - exact).abs().max()) < 1e-4
        assert float(((theirs * sim).sum((-2, -1)) - exact).abs().max()) < 1e-4


def test_balanced_transport_moves_all_the_mass():
    with pytest.raises(ValueError, match="top_percent=1"):
        sinkhorn(torch.rand(3, 2), top_percent=0.8, balanced=True)


# -- the learner ----------------------------------------------------------------------------


def start(tower, name="plot", seed=0, **options):
    method = method_from_name(name, options)
    params, consts = method.init(InitContext(tower, torch.Generator().manual_seed(seed)))
    dtype = tower.positional.dtype
    return method, {k: v.to(dtype) for k, v in params.items()}, consts


def patch_tokens(tower, n_images, n_patches=49, seed=5):
    gen = torch.Generator().manual_seed(seed)
    shape = (n_images, n_patches, tower.feature_dim)
    return torch.randn(*shape, generator=gen, dtype=tower.positional.dtype)


def paper_logits(tower, text, tokens, *, eps=0.1):
    """logit_c = logit_scale * sum_mn T_mn cos(x_m, t_{n,c}), T the converged balanced plan of
    the cost 1 - cos, one image and class at a time (text [N, n, D] normalised)."""
    rows = []
    for x in F.normalize(tokens, dim=-1):
        row = []
        for c in range(text.shape[1]):
            sim = x @ text[:, c].T  # [M, N]
            plan = textbook_sinkhorn(1.0 - sim.detach(), eps=eps)
            row.append(tower.logit_scale * (plan * sim).sum())
        rows.append(torch.stack(row))
    return torch.stack(rows)


def test_the_schemes_prompt_is_prompt_0_and_the_learner_owns_n_minus_1(tiny_tower):
    method, params, _ = start(tiny_tower)
    n_ctx, width = tiny_tower.n_ctx, tiny_tower.width
    assert {k: tuple(v.shape) for k, v in params.items()} == {
        "prompt": (n_ctx, width),
        PROMPTS: (3, n_ctx, width),
    }
    every = torch.cat([params["prompt"][None], params[PROMPTS]])
    assert all(abs(float(p.std()) - 0.02) < 0.006 for p in every)  # N(0, 0.02^2) draws
    assert len({tuple(p.flatten().tolist()) for p in every}) == 4
    _, six, _ = start(tiny_tower, n_prompts=6)
    assert six[PROMPTS].shape == (5, n_ctx, width)
    # ctx_init: prompt 0 is the phrase, the learner's own stay random (N copies would stay equal)
    init = InitContext(tiny_tower, torch.Generator().manual_seed(0), ctx_init="a photo of a")
    phrased, _ = method.init(init)
    torch.testing.assert_close(phrased["prompt"], tiny_tower.embed_phrase("a photo of a"))
    assert float(phrased[PROMPTS].std()) < 0.03


def test_encode_gives_every_prompts_text_features(tiny_tower):
    method, params, consts = start(tiny_tower)
    classes = torch.tensor([0, 2, 5])
    ctx = EncodeContext(tiny_tower, classes, consts)
    text = method.encode(params, {}, ctx)["text"]
    assert text.shape == (4, 3, tiny_tower.feature_dim)
    every = torch.cat([params["prompt"][None], params[PROMPTS]])
    for n, prompt in enumerate(every):
        torch.testing.assert_close(text[n], tiny_tower.encode(prompt, classes))


def test_logits_are_the_papers_transport_score(tower64):  # noqa: F811
    method, params, consts = start(tower64, **TIGHT)
    ctx = EncodeContext(tower64, torch.arange(4), consts)
    enc = method.encode(params, {}, ctx)
    tokens = patch_tokens(tower64, 3)
    got = method.logits(enc, tokens.mean(1), tokens, ctx)
    want = paper_logits(tower64, enc["text"], tokens)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(method.logits(enc, tokens[1].mean(0), tokens[1], ctx), want[1])
    assert torch.equal(method.predict(enc, tokens.mean(1), tokens, ctx), got.argmax(-1))


def test_hand_values_identical_prompts_and_identical_patches(tower64):  # noqa: F811
    method, params, consts = start(tower64, **TIGHT)
    ctx = EncodeContext(tower64, torch.arange(4), consts)
    scale = tower64.logit_scale
    # identical prompts: a uniform plan 1 / (M N), logit = s mean_m cos(x_m, t_c)
    same = {"prompt": params["prompt"], PROMPTS: params["prompt"].expand(3, -1, -1)}
    enc = method.encode(same, {}, ctx)
    tokens = F.normalize(patch_tokens(tower64, 2), dim=-1)
    want = scale * (tokens @ enc["text"][0].T).mean(1)
    torch.testing.assert_close(method.logits(enc, tokens.mean(1), tokens, ctx), want)
    # identical patches: logit = s mean_n cos(x, t_{n,c}), all the mass moved (not FedOTP's 0.8)
    enc = method.encode(params, {}, ctx)
    token = tokens[0, 0]
    got = method.logits(enc, token, token.expand(49, -1), ctx)
    torch.testing.assert_close(got, scale * (enc["text"] @ token).mean(0))


def _reference_loss(tower, leaves, classes, tokens, label):
    every = torch.cat([leaves["prompt"][None], leaves[PROMPTS]])
    text = torch.stack([tower.encode(p, classes) for p in every])  # [N, n, D]
    logits = paper_logits(tower, text, tokens[None])
    return F.cross_entropy(logits, label[None])


@pytest.mark.parametrize("given", [False, True])
def test_per_sample_gradients_of_all_prompts_equal_a_backward_per_sample_in_float64(
    tower64,  # noqa: F811
    given,
):
    """given: the plans solved for the batch outside vmap (`batch_constants`, as training does);
    otherwise inside the vmapped loss."""
    method, params, consts = start(tower64, **TIGHT)
    params = {k: v + 0.05 * torch.randn_like(v) for k, v in params.items()}  # away from init
    classes = torch.arange(4)
    ctx = EncodeContext(tower64, classes, consts)
    tokens = patch_tokens(tower64, 3, n_patches=9, seed=6)
    labels = torch.tensor([2, 0, 3])
    batch = (tokens.mean(1), tokens, labels)

    def encode(p):
        return method.encode(p, {}, ctx)

    def loss_one(z, x, t, y, *plans):
        return method.sample_loss(z, x, t, y, ctx, *plans)

    def plans(z, x, t, y):
        return method.batch_constants(z, t, ctx)

    got = step_gradients(
        encode, loss_one, params, batch, per_sample=True, constants=plans if given else None
    )
    assert set(got.data) == {"prompt", PROMPTS}
    for i in range(3):  # the paper's loss, one sample, one ordinary backward
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        _reference_loss(tower64, leaves, classes, tokens[i], labels[i]).backward()
        for k, leaf in leaves.items():
            assert float(leaf.grad.abs().min(-1).values.sum()) > 0, k  # every prompt is read
            torch.testing.assert_close(got.data[k][i], leaf.grad, rtol=1e-8, atol=1e-12)


def test_fedavg_shares_all_n_prompts_local_keeps_them():
    assert method_from_name("fedplot").shared == ("prompt", PROMPTS)
    assert method_from_name("plot").shared == ()


@pytest.mark.parametrize(
    ("pair", "needle"),
    [("plot@sigma_uv", "take for its extra prompts"), ("plot@promptfolio", "would leave out")],
)
def test_a_scheme_with_extra_prompts_or_a_text_mix_is_refused(pair, needle):
    from fpl_bench.catalog import resolve_method

    with pytest.raises(UsageError, match=needle):
        build_spec(methods=(resolve_method(pair),))


def test_global_local_hands_two_prompts_and_the_learner_adds_its_own(tiny_tower):
    method, params, consts = start(tiny_tower, "plot@global_local")
    ctx = EncodeContext(tiny_tower, torch.arange(3), consts)
    assert method.encode(params, {}, ctx)["text"].shape[0] == 2 + 3
    assert method.shared == ("p_global", PROMPTS)


@pytest.mark.parametrize("mode", ["none", "server", "client"])
def test_runs_through_the_driver_training_every_prompt(tiny_tower, mode):
    assert_trains_every_prompt(tiny_tower, mode, ("fedplot", "plot"), PROMPTS)


def assert_trains_every_prompt(tiny_tower, mode, presets, own):
    """Each of `presets` (federated, then local) runs two rounds without DP or under a trust
    model, trains the scheme's prompt and the learner's own prompts `own`, and shares them
    across clients only in the federated preset."""
    schedule, trust = Schedule(rounds=2, batch_size=8, lr=0.1), mode.replace("none", "server")
    for name, shared in zip(presets, (True, False), strict=True):
        run = FederatedRun(
            method_from_name(name),
            tiny_tower,
            make_federation(tiny_tower),
            schedule=schedule,
            seed=0,
            trust=trust,
        )
        before = run.view(0, evaluation=True)
        if mode != "none":
            run.enable_privacy(NoisePlan(noise_multiplier=1.0, clip_norm=1.0))
        out = run.run()
        last = out.history[-1]
        assert all(0.0 <= last[k] <= 1.0 for k in ("local_acc", "base_acc", "novel_acc"))
        views = [run.view(c, evaluation=True) for c in range(2)]
        for k in ("prompt", own):
            assert not torch.equal(before[k], views[0][k]), (name, k)
            assert torch.equal(views[0][k], views[1][k]) == shared, (name, k)
