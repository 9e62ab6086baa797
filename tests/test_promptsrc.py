"""PromptSRC against its reference's loss, written here with open_clip's own modules and the
reference's torch calls (F.l1_loss, F.kl_div with reduction "sum" over numel): the textual
target as the templates' ensemble, each term on small tensors, the per-sample loss and the
prior as the reference's batch loss; exact per-sample gradients of every parameter group
through both towers (float64, one backward per sample); the text term as a prior with no
per-sample part; runs through the driver and by name through the CLI, without DP and under
both trust models."""

from dataclasses import replace

import open_clip
import pytest
import torch
import torch.nn.functional as F

from fpl_bench.driver import FederatedRun, NoisePlan, Schedule
from fpl_bench.learners._base import EncodeContext
from fpl_bench.learners.promptsrc import TARGET, TEMPLATES, kl_per_class, l1_mean
from fpl_bench.method import method_from_name
from fpl_bench.privacy.per_sample import step_gradients
from tests.test_driver import image_federation
from tests.test_ivlp import assert_per_sample_rows_exact, encoded, start, trained
from tests.test_maple import build, paper_image, paper_text

OWN = ("promptsrc.text_deep", "promptsrc.vision")
WEIGHTS = {"image_weight": 10.0, "text_weight": 25.0, "logits_weight": 1.0}
MODES = ["none", "server", "client"]  # without DP, and under DP by trust model


@pytest.fixture(scope="module")
def towers():
    """(model, text tower, image tower) of the tiny model by dtype, each built once."""
    return {dtype: build(dtype) for dtype in (torch.float32, torch.float64)}


def promptsrc(**options):
    return method_from_name("promptsrc", options)


def ensemble(model, tower, templates):
    """The reference's textual target from open_clip's encode_text: each template's class
    features (normalised here, as CLIP's ensemble), averaged, normalised."""
    feats = []
    for template in templates:
        texts = [template.format(name) for name in tower.classnames]
        tokens = open_clip.tokenize(texts, context_length=model.context_length)
        feats.append(F.normalize(model.encode_text(tokens).to(tower.positional.dtype), dim=-1))
    return F.normalize(torch.stack(feats).mean(0), dim=-1)


def frozen_image(model, pixels):
    """Frozen CLIP's image features (normalised), by open_clip's encode_image."""
    return F.normalize(model.encode_image(pixels), dim=-1)


def reference_terms(model, tower, params, pixels, labels, classes, target, weights=WEIGHTS):
    """The reference's `forward_backward` on a batch: {"ce", "image", "text", "logits"}."""
    text = paper_text(model, tower, params["prompt"], params["promptsrc.text_deep"], classes)
    vision = params["promptsrc.vision"]
    image = F.normalize(
        torch.stack([paper_image(model, p, vision[0], vision[1:]) for p in pixels]), dim=-1
    )
    logits = tower.logit_scale * image @ text.T
    zs_image = frozen_image(model, pixels)
    zs_logits = tower.logit_scale * zs_image @ target[classes].T
    kl = F.kl_div(
        F.log_softmax(logits / 1, dim=1),
        F.log_softmax(zs_logits / 1, dim=1),
        reduction="sum",
        log_target=True,
    )
    return {
        "ce": F.cross_entropy(logits, labels),
        "image": F.l1_loss(image, zs_image, reduction="mean") * weights["image_weight"],
        "text": F.l1_loss(text, target[classes], reduction="mean") * weights["text_weight"],
        "logits": kl * (1 * 1) / logits.numel() * weights["logits_weight"],
    }


def frozen_federation(vision):
    """tests/test_driver.py's image federation with frozen CLIP's features as the pooled ones
    (what the feature cache holds): the cached tokens through the unprompted tower."""
    fed = image_federation(vision)
    v = vision.visual

    def pooled(features):
        with torch.no_grad():
            out, _ = v._pool(v.transformer(features.embedded))
        return replace(features, pooled=F.normalize(out @ v.proj, dim=-1))

    return replace(fed, train=pooled(fed.train), test=pooled(fed.test))


def test_the_target_is_the_template_ensemble_and_the_parameters_are_its_own(towers):
    model, tower, vision = towers[torch.float32]
    assert len(TEMPLATES) == len(set(TEMPLATES)) == 60 and TEMPLATES[0] == "a photo of a {}."
    params, consts = start(promptsrc(), tower, vision, torch.float32)
    assert set(OWN) <= set(params) and not any(k.startswith("ivlp.") for k in params)
    assert tuple(params["promptsrc.vision"].shape) == (3, 4, vision.width)
    want = ensemble(model, tower, TEMPLATES)
    torch.testing.assert_close(consts[TARGET], want, rtol=1e-5, atol=1e-5)
    _, one = start(promptsrc(n_templates=1), tower, vision, torch.float32)
    want_one = ensemble(model, tower, TEMPLATES[:1])
    torch.testing.assert_close(one[TARGET], want_one, rtol=1e-5, atol=1e-5)
    _, vpt = start(promptsrc(text_depth=0), tower, vision, torch.float32)
    assert "ivlp_text" in vpt and TARGET in vpt  # IVLP's VPT-deep text side, plus the target


def test_each_term_is_the_reference_call_on_small_tensors():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    torch.testing.assert_close(l1_mean(a, b), F.l1_loss(a, b, reduction="mean"))
    logits, zs = 3 * torch.randn(4, 6, generator=gen), 3 * torch.randn(4, 6, generator=gen)
    reference = (
        F.kl_div(F.log_softmax(logits, 1), F.log_softmax(zs, 1), reduction="sum", log_target=True)
        / logits.numel()
    )
    torch.testing.assert_close(kl_per_class(zs, logits).mean(), reference)
    q, p = zs.softmax(-1), logits.softmax(-1)  # KL(zero-shot || prompted), per class
    torch.testing.assert_close(kl_per_class(zs, logits), (q * (q / p).log()).sum(-1) / 6)
    assert torch.allclose(kl_per_class(zs, zs), torch.zeros(4), atol=1e-6)


@pytest.mark.parametrize(
    "weights", [WEIGHTS, {"image_weight": 2.0, "text_weight": 3.0, "logits_weight": 0.5}]
)
def test_sample_losses_and_prior_are_the_references_batch_loss(towers, weights):
    model, tower, vision = towers[torch.float64]
    method = promptsrc(**weights)
    params, consts = start(method, tower, vision)
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32, generator=gen, dtype=torch.float64)
    labels, classes = torch.tensor([0, 2, 1]), torch.tensor([0, 2, 3, 5])
    ctx = EncodeContext(tower, classes, consts, vision=vision)
    z, tokens, pooled = (
        encoded(method, params, ctx),
        vision.embed(pixels),
        frozen_image(model, pixels),
    )
    losses = torch.stack(
        [method.sample_loss(z, pooled[i], tokens[i], labels[i], ctx) for i in range(3)]
    )
    want = reference_terms(model, tower, params, pixels, labels, classes, consts[TARGET], weights)
    torch.testing.assert_close(losses.mean(), want["ce"] + want["image"] + want["logits"])
    torch.testing.assert_close(method.prior(params, z, ctx, {}), want["text"])
    assert all(float(want[k]) > 0 for k in want)


@pytest.mark.parametrize(("text_depth", "vision_depth"), [(9, 9), (1, 12)])
def test_per_sample_gradients_equal_a_backward_per_sample_in_float64(
    towers, text_depth, vision_depth
):
    model, tower, vision = towers[torch.float64]
    method = promptsrc(text_depth=text_depth, vision_depth=vision_depth)
    params, consts = start(method, tower, vision)
    gen = torch.Generator().manual_seed(2)
    pixels = torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64)
    labels, classes = torch.tensor([0, 3, 1, 1]), torch.arange(4)
    batch = (frozen_image(model, pixels), vision.embed(pixels), labels)
    target = consts[TARGET]

    def reference_loss(leaves, i):
        one = slice(i, i + 1)
        terms = reference_terms(model, tower, leaves, pixels[one], labels[one], classes, target)
        return terms["ce"] + terms["image"] + terms["logits"]

    ctx = EncodeContext(tower, classes, consts, vision=vision)
    rows = assert_per_sample_rows_exact(method, params, ctx, batch, reference_loss)
    assert all(rows[k].abs().sum() > 0 for k in ("prompt", *OWN) if rows[k].numel())


def test_the_text_term_is_a_prior_with_no_per_sample_part(towers):
    model, tower, vision = towers[torch.float64]
    method = promptsrc()
    params, consts = start(method, tower, vision)
    gen = torch.Generator().manual_seed(4)
    pixels = torch.randn(3, 3, 32, 32, generator=gen, dtype=torch.float64)
    labels, classes = torch.tensor([2, 0, 1]), torch.arange(4)
    batch = (frozen_image(model, pixels), vision.embed(pixels), labels)
    ctx = EncodeContext(tower, classes, consts, vision=vision)
    step, aux = method.step_params(params, torch.Generator())

    def grads(per_sample, prior):
        return step_gradients(
            lambda p: method.encode(p, aux, ctx),
            lambda z, *sample: method.sample_loss(z, *sample, ctx),
            step,
            batch,
            per_sample=per_sample,
            prior=(lambda z, p: method.prior(p, z, ctx, {})) if prior else None,
        )

    def autograd(which):
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        terms = reference_terms(model, tower, leaves, pixels, labels, classes, consts[TARGET])
        loss = sum(terms[k] for k in which)
        got = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        pairs = zip(leaves.items(), got, strict=True)
        return {k: torch.zeros_like(v) if g is None else g for (k, v), g in pairs}

    private, alone = grads(True, prior=True), grads(True, prior=False)
    prior, total = autograd(["text"]), autograd(["ce", "image", "logits", "text"])
    mean = grads(False, prior=True)
    for k in params:
        # the prior adds nothing per sample (its row rides the same batched backward, which
        # may round the other rows differently: float64 rounding, not the prior's size)
        torch.testing.assert_close(private.data[k], alone.data[k], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(private.prior[k], prior[k], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(mean.data[k], total[k], rtol=1e-9, atol=1e-11)
    assert not private.prior["promptsrc.vision"].any()  # text only: the image side is data
    assert private.prior["prompt"].abs().sum() > 0 and mean.prior is None


PRESETS = ["promptsrc", "fedpromptsrc"]


@pytest.mark.parametrize(("name", "mode"), [(n, m) for n in PRESETS for m in MODES])
def test_runs_through_the_driver(towers, name, mode):
    _, tower, vision = towers[torch.float32]
    run, before, out = trained(name, tower, frozen_federation(vision), mode, vision)
    after = run.view(0, evaluation=True)
    assert run.method.has_prior and 0.0 <= out.history[-1]["base_acc"] <= 1.0
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every parameter trained
    shared = set() if name == "promptsrc" else {"prompt", *OWN}
    assert set(run.method.shared) == shared


def test_gpa_weights_are_the_papers_gaussian_over_rounds():
    """Over the reference's 20 epochs (here rounds) the weights are N(r; 15, 1), normalised."""
    learner = promptsrc().learner
    got = torch.tensor([learner.round_weight(r, 20) for r in range(1, 21)], dtype=torch.float64)
    r = torch.arange(1, 21, dtype=torch.float64)
    want = torch.exp(-0.5 * (r - 15.0) ** 2) / (2 * torch.pi) ** 0.5  # N(r; 15, 1)
    torch.testing.assert_close(got / got.sum(), want / want.sum(), rtol=1e-12, atol=0)
    assert int(got.argmax()) + 1 == 15
    assert method_from_name("promptsrc", {"gpa_std": 0.0}).learner.round_weight(15, 20) is None


@pytest.mark.parametrize("mode", ["none", "server"])
def test_gpa_evaluates_the_weighted_mean_of_the_rounds_and_resumes_with_it(towers, mode):
    """The evaluation view (what is scored and released) is sum_r w_r P_r / sum_r w_r of the
    parameters after each round, training goes on from the live ones, and a checkpoint carries
    the mean; gpa_std = 0 evaluates the last parameters."""
    _, tower, vision = towers[torch.float32]
    fed = frozen_federation(vision)
    rounds = 4
    run, _, _ = trained("promptsrc", tower, fed, mode, vision, rounds=rounds)
    snapshots = []  # the live parameters after each round, from a second identical run
    live = FederatedRun(
        method_from_name("promptsrc"), tower, fed, schedule=Schedule(rounds=rounds, batch_size=4,
        lr=0.05), seed=0, trust="server", vision=vision,
    )  # fmt: skip
    if mode != "none":
        live.enable_privacy(NoisePlan(noise_multiplier=0.5, clip_norm=0.05))
    live.run(on_round_end=lambda r, out: snapshots.append({**live.clients[0].params}))
    weights = [run.method.learner.round_weight(r, rounds) for r in range(1, rounds + 1)]
    total = sum(weights)
    view = run.view(0, evaluation=True)
    for k, v in view.items():
        want = sum(w * s[k] for w, s in zip(weights, snapshots, strict=True)) / total
        torch.testing.assert_close(v, want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(v, snapshots[-1][k])  # not the last round's parameters
        assert torch.equal(run.clients[0].params[k], snapshots[-1][k])  # training goes on
    resumed = FederatedRun(
        method_from_name("promptsrc"), tower, fed, schedule=Schedule(rounds=rounds, batch_size=4,
        lr=0.05), seed=0, trust="server", vision=vision,
    )  # fmt: skip
    resumed.load_state_dict(run.state_dict())
    assert all(torch.equal(resumed.view(0, evaluation=True)[k], v) for k, v in view.items())
    off = FederatedRun(
        method_from_name("promptsrc", {"gpa_std": 0.0}), tower, fed,
        schedule=Schedule(rounds=2, batch_size=4, lr=0.05), seed=0, vision=vision,
    )  # fmt: skip
    off.run()
    assert all(
        torch.equal(v, off.clients[0].params[k]) for k, v in off.view(0, evaluation=True).items()
    )
